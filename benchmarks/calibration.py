"""The statistics pass against plain onnxruntime inference, and against the naive approach.

For each model and sample count, in one run (each approach --repeats times, in rotating order,
medians reported): plain inference time (an optimised onnxruntime
session over the same batches), the egp-onnx statistics pass (collect_statistics), the naive
pass (every rectifier input made a graph output and reduced in numpy), their ratios, and the
peak resident memory of each, measured in a fresh subprocess. The data is streamed from .npz
shards of 512 samples, as a user's calibration folder would be. Then the whole-process check:
`egp-onnx analyze` vs a plain onnxruntime script on the 8-conv chain, 512 samples, batch 32;
and the cost of rebuilding the statistics session per loop step.

Run: python benchmarks/calibration.py [--samples 512 8192] [--batch-size 32] [--repeats 3]
[--models resnet4x32@32 ...] [--no-naive] [--no-refit] [--baseline DIR] [--overlap] [--floor]

``--baseline DIR`` adds a fourth approach, interleaved with the others: the statistics pass of
the egp_onnx package found in DIR (e.g. ``git archive`` of an earlier commit), to measure a
change against the code before it in one run. ``--overlap`` adds plain inference scheduled as
the statistics pass is (two batches at once, each on half the cores): what that alone gains.
``--floor`` adds the statistics pass with the probes' indicator (HardSigmoid) left out, each ReLU
output pooled as it is: wrong counts, but the time any probe that reads each output once more
would take at least (``floor/plain``).

``refit`` (on unless --no-refit) is one reconstruction step: 50% of every prunable layer removed
by magnitude, then every layer refit (egp_onnx.reconstruct.refit, at most its MAX_SAMPLES first samples),
reported as its time over the statistics pass's (``refit/egp``) and its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHARD = 512


def _shards(folder: Path, samples: int, shape: tuple[int, ...], seed: int = 0) -> Path:
    target = folder / f"data_{'x'.join(map(str, shape))}_{samples}"
    if not target.exists():
        target.mkdir()
        rng = np.random.default_rng(seed)
        for i in range(0, samples, SHARD):
            np.savez(
                target / f"part{i // SHARD:04d}.npz", x=rng.normal(size=(SHARD, *shape)).astype(np.float32)
            )
    return target


def worker(approach: str, model_path: str, data_dir: str, batch_size: int) -> dict:
    """One measured pass, in this (fresh) process."""
    import onnxruntime as ort

    from egp_onnx.calibrate.collect import collect_statistics
    from egp_onnx.graph.rectifiers import find_rectifiers
    from egp_onnx.load.calibration import open_calibration
    from egp_onnx.load.model import load_model

    model = load_model(model_path)
    data = open_calibration(data_dir, model)
    sites = find_rectifiers(model)
    if approach == "refit":
        from egp_onnx.prune.loop import LayerSet
        from egp_onnx.reconstruct.refit import reconstruct

        layers = LayerSet(model, sites)
        remove = {n: w.size // 2 for n, w in zip(layers.weight_names, layers.weights, strict=True)}
    if approach == "floor":
        _without_indicator()
    start = time.perf_counter()
    if approach in ("egp", "floor"):
        collect_statistics(model, sites, data, batch_size)
    elif approach == "refit":
        reconstruct(model, model, data, batch_size, remove=remove, masked=layers.weight_names)
    elif approach == "overlap":
        _overlapped_plain(model, data, batch_size)
    else:
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
        names = [s.input for s in sites] if approach == "naive" else [o.name for o in model.graph.output]
        if approach == "naive":
            del exposed.graph.output[:]
            for name in names:
                exposed.graph.output.append(
                    onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                )
        session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
        counts = [0 for _ in names]
        for feed, _ in data.batches(batch_size):
            outputs = session.run(names, feed)
            if approach == "naive":
                counts = [
                    c + (z > 0).sum(axis=tuple(i for i in range(z.ndim) if i != 1))
                    for c, z in zip(counts, outputs, strict=True)
                ]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _without_indicator() -> None:
    """Make the statistics pass pool each ReLU output itself, without the probe's HardSigmoid.

    Its counts are meaningless; its time is what reading every probed tensor once more costs in
    the same session, scheduling and pooling: the floor of any probe that reads each once.
    """
    from egp_onnx.calibrate import collect as calibrate

    build = calibrate.statistics_model

    def pooled_directly(*args, **kwargs):
        stats = build(*args, **kwargs)
        indicator = {n.output[0]: n.input[0] for n in stats.graph.node if n.op_type == "HardSigmoid"}
        nodes = [n for n in stats.graph.node if n.op_type != "HardSigmoid"]
        for node in nodes:
            node.input[:] = [indicator.get(i, i) for i in node.input]
        del stats.graph.node[:]
        stats.graph.node.extend(nodes)
        return stats

    calibrate.statistics_model = pooled_directly


def _overlapped_plain(model: onnx.ModelProto, data, batch_size: int) -> None:
    """Plain inference run the way the statistics pass runs: IN_FLIGHT batches at once, each on
    its share of the cores (the reference for what that scheduling alone gains)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort

    from egp_onnx.calibrate.collect import IN_FLIGHT

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, len(os.sched_getaffinity(0)) // IN_FLIGHT)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    pending: deque = deque()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        for feed, _ in data.batches(batch_size):
            pending.append(pool.submit(session.run, names, feed))
            if len(pending) >= IN_FLIGHT:
                pending.popleft().result()
        while pending:
            pending.popleft().result()


def measure(
    approach: str, model_path: Path, data_dir: Path, batch_size: int, baseline: Path | None = None
) -> dict:
    env = dict(os.environ)
    if approach == "baseline":
        assert baseline is not None  # the approach is only listed with --baseline
        env["PYTHONPATH"] = os.pathsep.join([str(baseline), env.get("PYTHONPATH", "")])
        approach = "egp"
    out = subprocess.run(
        [sys.executable, __file__, "--worker", approach, str(model_path), str(data_dir), str(batch_size)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(
    model_path: Path,
    data_dir: Path,
    batch_size: int,
    repeats: int,
    approaches: list[str],
    baseline: Path | None,
) -> dict[str, dict]:
    """The approaches' passes, each in a fresh process, in rotating order; medians per approach."""
    runs: dict[str, list[dict]] = {a: [] for a in approaches}
    for r in range(repeats):
        k = r % len(approaches)
        for approach in approaches[k:] + approaches[:k]:
            runs[approach].append(measure(approach, model_path, data_dir, batch_size, baseline))
    nan = {"seconds": float("nan"), "peak_mb": float("nan")}
    medians = {
        a: {key: float(np.median([run[key] for run in runs[a]])) for key in ("seconds", "peak_mb")}
        for a in approaches
    }
    return {
        a: medians.get(a, nan) for a in ("plain", "egp", "naive", "baseline", "overlap", "refit", "floor")
    }


def whole_process(model_path: Path, data: Path, batch_size: int, folder: Path) -> tuple[float, float]:
    """Wall time of `egp-onnx analyze` and of a plain onnxruntime script, start-up included."""
    script = folder / "plain.py"
    script.write_text(
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "with np.load(sys.argv[2]) as d: x = d['x']\n"
        f"for i in range(0, len(x), {batch_size}): s.run(None, {{'x': x[i:i + {batch_size}]}})\n"
    )

    def wall(cmd: list[str]) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            best = min(best, time.perf_counter() - start)
        return best

    egp = wall(
        [
            sys.executable,
            "-m",
            "egp_onnx",
            "analyze",
            str(model_path),
            "--calib",
            str(data),
            "--batch-size",
            str(batch_size),
        ]
    )
    plain = wall([sys.executable, str(script), str(model_path), str(data)])
    return egp, plain


def session_rebuild_cost(model_path: Path, data_dir: Path, batch_size: int) -> tuple[float, float]:
    """Seconds to build the statistics session, and seconds of the pass it serves."""
    from egp_onnx.calibrate.collect import collect_statistics
    from egp_onnx.calibrate.probes import statistics_model
    from egp_onnx.graph.rectifiers import find_rectifiers
    from egp_onnx.load.calibration import open_calibration
    from egp_onnx.load.model import load_model
    from egp_onnx.runtime.session import STATISTICS, make_session

    model = load_model(model_path)
    sites = find_rectifiers(model)
    start = time.perf_counter()
    make_session(statistics_model(model, sites), STATISTICS)
    build = time.perf_counter() - start
    start = time.perf_counter()
    collect_statistics(model, sites, open_calibration(data_dir, model), batch_size)
    return build, time.perf_counter() - start - build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="passes of each approach (medians)")
    parser.add_argument("--models", nargs="+", help="only these models (default: all)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive approach")
    parser.add_argument("--no-refit", action="store_true", help="skip the reconstruction step")
    parser.add_argument("--baseline", type=Path, help="also time the egp_onnx package in this folder")
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="also time plain inference with the statistics pass's scheduling",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time the statistics pass with its probes' indicator left out (the floor of any probe)",
    )
    args = parser.parse_args()
    approaches = [
        "plain",
        "egp",
        *([] if args.no_naive else ["naive"]),
        *([] if args.no_refit else ["refit"]),
    ]
    if args.baseline:
        approaches.append("baseline")
    if args.overlap:
        approaches.append("overlap")
    if args.floor:
        approaches.append("floor")
    from models import conv_chain, mobilenet, resnet

    from egp_onnx.report.render import format_table

    folder = Path(tempfile.mkdtemp(prefix="egp-bench-"))
    models = {"chain8x64@32": conv_chain(), "resnet4x32@32": resnet(), "mobilenet@32": mobilenet()}
    paths = {}
    for name, model in models.items():
        paths[name] = folder / f"{name}.onnx"
        onnx.save(model, str(paths[name]))
    for sample in ("digits_resnet", "mnist_resnet"):
        if (HERE.parent / "sample_models" / f"{sample}.onnx").exists():
            paths[sample] = HERE.parent / "sample_models" / f"{sample}.onnx"
    if args.models:
        paths = {name: path for name, path in paths.items() if name in args.models}
    rows = []
    for name, path in paths.items():
        first = onnx.load(str(path)).graph.input[0]
        data_name = first.name
        shape = tuple(d.dim_value for d in first.type.tensor_type.shape.dim[1:])
        for samples in args.samples:
            data = _shards(folder, samples, shape)
            if data_name != "x":  # the samples' inputs have their own names
                renamed = folder / f"{data.name}_{data_name}"
                if not renamed.exists():
                    renamed.mkdir()
                    for part in sorted(data.iterdir()):
                        with np.load(part) as npz:
                            np.savez(renamed / part.name, **{data_name: npz["x"]})
                data = renamed
            found = interleaved(path, data, args.batch_size, args.repeats, approaches, args.baseline)
            plain, egp, naive, base, overlap, refit, floor = (
                found[a] for a in ("plain", "egp", "naive", "baseline", "overlap", "refit", "floor")
            )
            rows.append(
                [
                    name,
                    samples,
                    plain["seconds"],
                    egp["seconds"],
                    naive["seconds"],
                    egp["seconds"] / plain["seconds"],
                    naive["seconds"] / plain["seconds"],
                    plain["peak_mb"],
                    egp["peak_mb"],
                    naive["peak_mb"],
                    base["seconds"] / plain["seconds"],
                    overlap["seconds"] / plain["seconds"],
                    refit["seconds"] / egp["seconds"],
                    refit["peak_mb"],
                    floor["seconds"] / plain["seconds"],
                    os.getloadavg()[0],
                ]
            )
    headers = [
        "model",
        "samples",
        "plain_s",
        "egp_s",
        "naive_s",
        "egp/plain",
        "naive/plain",
        "plain_MB",
        "egp_MB",
        "naive_MB",
        "base/plain",
        "overlap/plain",
        "refit/egp",
        "refit_MB",
        "floor/plain",
        "load",
    ]
    print(format_table(headers, rows))
    for name in paths:
        mine = [r for r in rows if r[0] == name]
        if len(mine) >= 2:
            print(
                f"{name}: egp peak memory at {mine[-1][1]} vs {mine[0][1]} samples: "
                f"{mine[-1][8] / mine[0][8]:.3f}x (plain {mine[-1][7] / mine[0][7]:.3f}x, "
                f"refit {mine[-1][13] / mine[0][13]:.3f}x)"
            )
    if "chain8x64@32" not in paths:
        print(f"\nload average {os.getloadavg()[0]:.2f}")
        return
    chain_data = folder / "chain512.npz"
    with np.load(sorted(_shards(folder, 512, (3, 32, 32)).iterdir())[0]) as npz:
        np.savez(chain_data, x=npz["x"])
    egp_wall, plain_wall = whole_process(paths["chain8x64@32"], chain_data, args.batch_size, folder)
    print(
        f"\nwhole process, chain8x64@32, 512 samples, batch {args.batch_size}: egp-onnx analyze "
        f"{egp_wall:.2f} s, plain onnxruntime script {plain_wall:.2f} s, ratio {egp_wall / plain_wall:.2f} "
        "(target <= 1.5)"
    )
    build, run = session_rebuild_cost(
        paths["chain8x64@32"], _shards(folder, 512, (3, 32, 32)), args.batch_size
    )
    print(
        f"statistics session build {build * 1000:.0f} ms vs its 512-sample pass {run * 1000:.0f} ms: "
        f"rebuilding it each loop step costs {build / (build + run):.1%} of a step"
    )
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"onnxruntime {__import__('onnxruntime').__version__}; load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    else:
        main()
