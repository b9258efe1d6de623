"""Statistics, refit, guard and a whole compress on a Dask LocalCluster against one process.

On the same data and the same cores, in one run, configurations interleaved (rotating order per
repeat, medians reported), each in a fresh subprocess:

- ``single``: collect_statistics in this process (two batches in flight, as egp-onnx runs it);
- ``local:1`` / ``local:2``: a LocalCluster of 1 / 2 worker processes on this machine.

A timed pass is a loop step's pass: a new model version is shared with the workers (each builds
its statistics session once), the parts run, the counts come back and are merged. The cluster's
start-up (once per run) and one warm-up pass (imports, the loaders shared once per run) are
reported apart. Peak memory: the client's and every worker's peak resident set.

The same for one reconstruction sweep (a loop step's refit: every layer of a model with a third
of each layer's weights pruned, refit against the original on the first 1024 samples; on a
cluster each part's activations stay on its worker, two round trips per layer) and one guard
measurement (a new candidate against the stored outputs of 1,024 held-out test images). For each,
the results' digest (identical in every configuration or not) and the bytes moved per step:
every call's arguments and answer, pickled (a model counted once per worker).

Then whole ``egp-onnx compress --no-latency`` runs of the MNIST sample, the configurations
interleaved in rotating order (``--compress-repeats`` rounds; medians, each round's ratio and the
load average of each run), every model and report compared byte for byte; and the throughput
model for ImageNet-size data.

Run: python benchmarks/dask_scaling.py [--repeats 3] [--passes 3] [--no-compress | --only-compress]
[--compress-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = ROOT / "sample_models" / "mnist_resnet.onnx"
CALIB = ROOT / "sample_models" / "mnist_calib.npz"
TEST = ROOT / "sample_models" / "mnist_test.npz"
CONFIGS = ("single", "local:1", "local:2")
KINDS = ("stats", "refit", "guard")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _moved(cluster, out: dict, label: str):
    """Wrap ``cluster.ask`` to add up the pickled bytes of every call's arguments and answer.

    A Kept argument (the model, the data) counts only where it is sent with its value (once per
    worker); a Payload (a layer's request) counts once per call, as it is sent.
    """
    from egp_onnx.runtime.cluster import Kept, Placed

    original_ask = cluster.ask

    def size(handle, arg) -> int:
        if isinstance(arg, Kept):
            return 0 if arg.key in handle.kept.get(arg.slot, {}) else len(arg.pickled)
        if isinstance(arg, Placed) or type(arg).__name__ == "Future":
            return 0
        return len(pickle.dumps(arg))

    def counting_ask(calls, on_answer=None):
        sent = sum(size(handle, a) for handle, _, args in calls for a in args)
        results = original_ask(calls, on_answer)
        back = [len(pickle.dumps(r)) for r in results]
        out[f"{label}_sent"] = out.get(f"{label}_sent", 0) + sent
        out[f"{label}_back"] = out.get(f"{label}_back", 0) + sum(back)
        out[f"{label}_largest_result"] = max(out.get(f"{label}_largest_result", 0), *back)
        out[f"{label}_calls"] = out.get(f"{label}_calls", 0) + len(calls)
        return results

    cluster.ask = counting_ask


def _refit_case():
    """The MNIST sample with a third of each layer's weights pruned: a loop step's refit."""
    import numpy as np

    from egp_onnx.graph.layers import linear_layers
    from egp_onnx.graph.weights import initializer_arrays, replace_initializers
    from egp_onnx.load.calibration import open_calibration
    from egp_onnx.load.model import load_model
    from egp_onnx.prune.budget import prune_smallest

    model = load_model(MODEL)
    layers, _ = linear_layers(model)
    weights = initializer_arrays(model, [layer.weight for layer in layers])
    rng = np.random.default_rng(0)
    pruned = replace_initializers(model, {n: prune_smallest(w, w.size // 3, rng) for n, w in weights.items()})
    remove = {n: max(1, w.size // 20) for n, w in weights.items()}  # the step's own share
    return model, pruned, open_calibration(CALIB, model), remove


def child_sweep(config: str, kind: str, passes: int, batch_size: int) -> dict:
    """In a fresh process: ``passes`` timed refit sweeps or guard measurements in one configuration."""
    import hashlib

    import numpy as np
    import onnx

    from egp_onnx.config import Settings
    from egp_onnx.load.calibration import open_calibration
    from egp_onnx.reconstruct.refit import reconstruct
    from egp_onnx.runtime.cluster import open_cluster
    from egp_onnx.verify.fidelity import Reference
    from egp_onnx.verify.guard import Guard

    model, pruned, data, remove = _refit_case()
    out: dict = {"config": config, "kind": kind, "model_bytes": model.ByteSize()}
    if kind == "guard":
        with tempfile.TemporaryDirectory() as tmp:
            test = np.load(TEST)
            np.savez(Path(tmp) / "held.npz", image=test["image"][:1024], labels=test["labels"][:1024])
            held = open_calibration(Path(tmp) / "held.npz", model)
            reference = Reference(model, held, batch_size)
        out["parts"] = len(reference.parts())

    def once(cluster) -> str:
        if kind == "refit":
            options = {"remove": remove, "masked": list(remove), "cluster": cluster}
            result = reconstruct(model, pruned, data, batch_size, **options)
            return hashlib.sha256(result.model.SerializeToString()).hexdigest()
        candidate = onnx.ModelProto()
        candidate.CopyFrom(pruned)  # a new candidate each time: shipped and its sessions built again
        fidelity, _ = Guard(reference, Settings(), lambda m: {}, cluster=cluster)(candidate)
        return repr(fidelity)

    def timed(cluster) -> list[float]:
        times = []
        for _ in range(passes):
            t = time.perf_counter()
            out["digest"] = once(cluster)
            times.append(time.perf_counter() - t)
        return times

    if config == "single":
        once(None)  # warm-up, as the cluster's
        out.update(times=timed(None), client_mib=_peak_mib(), worker_mib=[])
        return out
    t = time.perf_counter()
    with open_cluster(config) as cluster:
        out["startup"] = time.perf_counter() - t
        t = time.perf_counter()
        once(cluster)
        out["warmup"] = time.perf_counter() - t
        out["times"] = timed(cluster)
        peaks = cluster.client.run(_peak_mib)
        out.update(client_mib=_peak_mib(), worker_mib=sorted(peaks.values()))
        _moved(cluster, out, "step")
        once(cluster)  # one more, counted: what a step moves
        out["workers"] = cluster.workers
    if kind == "refit":
        from egp_onnx.graph.layers import linear_layers

        out["layers"] = len(linear_layers(model)[0])
    return out


def child_pass(config: str, passes: int, batch_size: int) -> dict:
    """In a fresh process: ``passes`` timed statistics passes in one configuration."""
    import numpy as np
    import onnx

    from egp_onnx.calibrate import collect
    from egp_onnx.graph.rectifiers import find_rectifiers
    from egp_onnx.load.calibration import open_calibration
    from egp_onnx.load.model import load_model
    from egp_onnx.load.parts import plan_parts
    from egp_onnx.runtime.cluster import open_cluster

    model = load_model(MODEL)
    sites = find_rectifiers(model)
    data = open_calibration(CALIB, model)
    out: dict = {"config": config}
    if config == "single":
        collect.collect_statistics(model, sites, data, batch_size)  # warm-up, as the cluster's
        times = []
        for _ in range(passes):
            t = time.perf_counter()
            first = collect.collect_statistics(model, sites, data, batch_size)
            times.append(time.perf_counter() - t)
        out.update(times=times, client_mib=_peak_mib(), worker_mib=[])
    else:
        t = time.perf_counter()
        with open_cluster(config) as cluster:
            out["startup"] = time.perf_counter() - t
            t = time.perf_counter()
            collect.collect_statistics(model, sites, data, batch_size, cluster=cluster)
            out["warmup"] = time.perf_counter() - t
            times = []
            for _ in range(passes):
                version = onnx.ModelProto()
                version.CopyFrom(model)  # a loop step's new model: shipped, its sessions built again
                t = time.perf_counter()
                first = collect.collect_statistics(version, sites, data, batch_size, cluster=cluster)
                times.append(time.perf_counter() - t)
            peaks = cluster.client.run(_peak_mib)
            out.update(times=times, client_mib=_peak_mib(), worker_mib=sorted(peaks.values()))
            # What moves per step, measured on the objects themselves.
            parts = plan_parts(data, batch_size)
            kept = (cluster.kept_model(model), cluster.kept_once("loaders", data.loaders))
            shared = (kept[0].key, sites, data.specs, data.description, kept[1].key)
            item = (parts[0], batch_size, cluster.threads)
            one = cluster.run_parts(collect.count_part, kept, shared, [item])[0]
            out["result_bytes"] = len(pickle.dumps(one))
            out["channels"] = sum(on.size for on, _ in one.totals)
            out["parts"] = len(parts)
            out["part_samples"] = parts[0].samples
            t = time.perf_counter()
            for _ in range(100):
                merged = [(on + on, ev + ev) for on, ev in one.totals]
            out["merge_per_part"] = (time.perf_counter() - t) / 100
            del merged
    out["model_bytes"] = model.ByteSize()
    out["samples"] = first.samples
    out["digest"] = str(hash(tuple(np.concatenate([c.on for c in first.counts.values()]).tolist())))
    return out


def run_child(config: str, passes: int, batch_size: int, kind: str = "stats") -> dict:
    """One configuration in a fresh subprocess (its own peak memory, its own cluster)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        __file__,
        "--child",
        config,
        "--kind",
        kind,
        "--passes",
        str(passes),
        "--batch-size",
        str(batch_size),
    ]
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_compress(config: str, folder: Path) -> tuple[float, bytes, bytes]:
    """``egp-onnx compress --no-latency`` of the MNIST sample: wall time, model and report bytes."""
    out, report = folder / f"{config.replace(':', '')}.onnx", folder / f"{config.replace(':', '')}.json"
    args = [sys.executable, "-m", "egp_onnx", "compress", str(MODEL), "--calib", str(CALIB), "-o", str(out)]
    args += ["--report", str(report), "--no-latency", "-q", "--force"]
    if config != "single":
        args += ["--scheduler", config]
    t = time.perf_counter()
    subprocess.run(args, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t, out.read_bytes(), report.read_bytes()


def throughput_model(measured: dict, sample_seconds: float, workers: list[int]) -> list[str]:
    """Per-step time and bytes moved for ImageNet-size data (50,000 images, a ResNet-50-class model).

    Per part: part_samples x sample_seconds on one worker; the model goes to every worker once
    per step (its session built once there); each part sends back its counts (int64 per
    channel); the client merges parts one after another.
    """
    samples, part_samples = 50_000, measured["part_samples"]
    parts = -(-samples // part_samples)
    model_bytes = 102 * 2**20  # ResNet-50 in float32
    channels = 26_560  # ReLU channels of ResNet-50 (every rectifier site's channels summed)
    result_bytes = channels * 8 * 2 + 4096  # ON counts and events (int64), pickling overhead
    merge = measured["merge_per_part"] * channels / measured["channels"]
    build = 2.0  # seconds: a worker's statistics session of a ResNet-50 (graph + weights)
    bandwidth = 1.25e9  # bytes/s: 10 GbE from the scheduler's side
    lines = [
        f"ImageNet-size model: {samples} samples in {parts} parts of {part_samples}, "
        f"{sample_seconds:.3f} s per sample per worker core, model {model_bytes / 2**20:.0f} MiB, "
        f"{result_bytes / 1024:.0f} KiB per part back, merge {merge * 1e3:.2f} ms per part, "
        f"session build {build:.0f} s, {bandwidth / 1e9:.2f} GB/s",
        f"{'workers':>8} {'compute s':>10} {'model s':>8} {'merge s':>8} {'step s':>8} {'speed-up':>9} "
        f"{'MiB moved':>10} {'moved/sample':>13}",
    ]
    one = parts * part_samples * sample_seconds + build + merge * parts
    for w in workers:
        compute = -(-parts // w) * part_samples * sample_seconds + build
        ship = model_bytes * w / bandwidth  # a broadcast from one place; a tree would be log(w)
        merging = merge * parts
        step = compute + ship + merging
        moved = model_bytes * w + result_bytes * parts
        lines.append(
            f"{w:>8} {compute:>10.1f} {ship:>8.2f} {merging:>8.3f} {step:>8.1f} {one / step:>8.1f}x "
            f"{moved / 2**20:>10.0f} {'0 (data on a shared path)':>13}"
        )
    lines.append(
        "bytes moved per step = model x workers + parts x counts: independent of the samples' bytes "
        "(each part's data is read by its worker from the shared path, never sent)"
    )
    return lines


def print_sweep(kind: str, label: str, runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """A sweep's table: medians, ratios to one process, memory, and what a step moved."""
    digests = {run["digest"] for rs in runs.values() for run in rs}
    base = statistics.median(t for run in runs["single"] for t in run["times"])
    print(
        f"\n{label}, MNIST sample, {args.repeats} repeats x {args.passes}, medians; "
        f"results identical in every run: {len(digests) == 1}"
    )
    print(
        f"{'config':>8} {'step s':>8} {'ratio':>6} {'start s':>8} {'warm-up s':>9} {'client MiB':>10} "
        f"{'worker MiB':>14} {'KiB out':>8} {'KiB back':>8} {'calls':>6} {'largest B':>9}"
    )
    for config in CONFIGS:
        t = statistics.median(x for run in runs[config] for x in run["times"])
        first = runs[config][0]
        start = f"{statistics.median(r['startup'] for r in runs[config]):.1f}" if "startup" in first else "-"
        warm = f"{statistics.median(r['warmup'] for r in runs[config]):.2f}" if "warmup" in first else "-"
        client = max(run["client_mib"] for run in runs[config])
        workers = [max(run["worker_mib"][i] for run in runs[config]) for i in range(len(first["worker_mib"]))]
        moved = (
            f"{first['step_sent'] / 1024:>8.0f} {first['step_back'] / 1024:>8.0f} {first['step_calls']:>6} "
            f"{first['step_largest_result']:>9}"
            if "step_sent" in first
            else f"{'-':>8} {'-':>8} {'-':>6} {'-':>9}"
        )
        print(
            f"{config:>8} {t:>8.3f} {t / base:>6.2f} {start:>8} {warm:>9} {client:>10.0f} "
            f"{' '.join(f'{w:.0f}' for w in workers) or '-':>14} {moved}"
        )
    shared = runs["local:2"][0]
    print(
        f"  plus the shared objects: the model ({shared['model_bytes'] / 1024:.0f} KiB) to each worker once "
        f"per step{' (the same candidate as the statistics pass that follows)' if kind == 'guard' else ''}"
    )


def resnet50_layers() -> list[tuple[int, int, int]]:
    """(groups, columns d with the bias, outputs) of ResNet-50's conv and FC layers."""
    layers = [(1, 3 * 49 + 1, 64)]
    cin = 64
    for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512)):
        for b in range(blocks):
            layers += [(1, cin + 1, width), (1, 9 * width + 1, width), (1, width + 1, 4 * width)]
            if b == 0:
                layers.append((1, cin + 1, 4 * width))  # the projection shortcut
            cin = 4 * width
    return [*layers, (1, 2048 + 1, 1000)]


def refit_guard_model(sample_seconds: float, workers: list[int], latency: float = 1e-3) -> list[str]:
    """On paper: one refit sweep and one guard measurement per step at ImageNet size.

    Refit: 1024 samples in 4 parts of 256 (fixed: parts, not workers, fix the sums), so at most
    4 workers share it; per part both models run once (2 x 256 x sample_seconds) and the Gram
    products take 2 x rows x d^2 flops per layer (rows = 64 per column, 64 positions per sample
    at most) at an assumed 20 GFLOP/s per worker core; a layer wider than 4096 columns is not
    refit. Per layer two round trips (latency each), the layer's new weights to each part and
    each part's float64 G (d^2) and C (d x outputs) back; the client solves (not modelled: the
    same as in one process). Guard: the automatic held-out split of 12,500 images, one candidate
    run per image, spread over the workers; the held-out batches and the original's outputs go
    to every worker once per run (not per step), sums of a few hundred bytes per part back.
    """
    flops, bandwidth, parts, samples = 20e9, 1.25e9, 4, 1024
    layers = [(g, d, o) for g, d, o in resnet50_layers() if d <= 4096]
    weights_bytes = sum(d * o * 4 for _, d, o in layers)
    sums_bytes = sum((d * d + d * o + o) * 8 for _, d, o in layers)
    products = sum(2 * min(64 * d, 64 * samples) * d * d for _, d, _ in layers) / flops
    forward = 2 * samples * sample_seconds
    held, held_bytes = 12_500, 12_500 * 3 * 224 * 224 * 4 + 12_500 * 1000 * 4
    lines = [
        f"refit on paper: {len(layers)} of {len(resnet50_layers())} ResNet-50 layers refittable, "
        f"one worker core {forward:.0f} s of forward passes + {products:.0f} s of Gram products; "
        f"per step {parts} x {weights_bytes / 2**20:.0f} MiB of weights out, "
        f"{parts} x {sums_bytes / 2**20:.0f} MiB of sums back; guard: {held} held-out images, "
        f"{held_bytes / 2**30:.1f} GiB to each worker once per run",
        f"{'workers':>8} {'refit s':>8} {'moved s':>8} {'trips s':>8} {'guard s':>8} {'refit x':>8} "
        f"{'guard x':>8}",
    ]
    one_refit = forward + products + 2 * len(layers) * latency
    one_guard = held * sample_seconds
    for w in workers:
        busy = min(w, parts)
        compute = -(-parts // busy) * (forward + products) / parts
        moved = parts * (weights_bytes + sums_bytes) / bandwidth
        trips = 2 * len(layers) * latency
        guard = -(-held // 256 // w) * 256 * sample_seconds + 0.2
        refit = compute + moved + trips
        lines.append(
            f"{w:>8} {refit:>8.0f} {moved:>8.2f} {trips:>8.2f} {guard:>8.0f} {one_refit / refit:>7.1f}x "
            f"{one_guard / guard:>7.1f}x"
        )
    return lines


def compress_stage(repeats: int) -> None:
    """Whole compresses interleaved: single, local:2, local:1 in rotating order, ``repeats`` rounds.

    Each run's load average (1 minute) is printed beside its time: local:2 needs both cores, and
    on a machine shared with other jobs it has them less often than one process does.
    """
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    loads: dict[str, list[float]] = {c: [] for c in CONFIGS}
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        first: tuple[bytes, bytes] | None = None
        print("\nwhole compress --no-latency of the MNIST sample, interleaved:")
        for r in range(repeats):
            order = CONFIGS[r % 3 :] + CONFIGS[: r % 3]
            for config in order:
                load = os.getloadavg()[0]
                seconds, model, report = run_compress(config, Path(tmp))
                first = first or (model, report)
                same = same and (model, report) == first
                times[config].append(seconds)
                loads[config].append(load)
                print(f"  round {r + 1} {config:>8} {seconds:7.1f} s  load {load:5.1f}")
    base = statistics.median(times["single"])
    print(f"every model and report byte-identical to the first run's: {same}")
    print(
        f"{'config':>8} {'median s':>9} {'min s':>7} {'max s':>7} {'ratio':>6} {'per round':>12} {'load':>10}"
    )
    for config in CONFIGS:
        t = times[config]
        ratios = [a / b for a, b in zip(t, times["single"], strict=True)]  # each round's own pair
        print(
            f"{config:>8} {statistics.median(t):>9.1f} {min(t):>7.1f} {max(t):>7.1f} "
            f"{statistics.median(t) / base:>6.2f} {min(ratios):>5.2f}-{max(ratios):<5.2f} "
            f"{min(loads[config]):>4.1f}-{max(loads[config]):<4.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-compress", action="store_true")
    parser.add_argument("--compress-repeats", type=int, default=3, help="rounds of the whole compress")
    parser.add_argument("--only-compress", action="store_true", help="the whole compress alone")
    parser.add_argument("--sample-seconds", type=float, default=0.16, help="ResNet-50, one core, per image")
    parser.add_argument("--child")
    parser.add_argument("--kind", default="stats", choices=KINDS)
    args = parser.parse_args()
    if args.child:
        if args.kind == "stats":
            print(json.dumps(child_pass(args.child, args.passes, args.batch_size)))
        else:
            print(json.dumps(child_sweep(args.child, args.kind, args.passes, args.batch_size)))
        return
    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} cores (shared with other jobs)")
    if args.only_compress:
        compress_stage(args.compress_repeats)
        print(f"\nload average at end: {os.getloadavg()}")
        return
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    sweeps: dict[str, dict[str, list[dict]]] = {k: {c: [] for c in CONFIGS} for k in KINDS[1:]}
    for r in range(args.repeats):
        order = CONFIGS[r % 3 :] + CONFIGS[: r % 3]
        for config in order:
            runs[config].append(run_child(config, args.passes, args.batch_size))
            for kind in KINDS[1:]:
                sweeps[kind][config].append(run_child(config, args.passes, args.batch_size, kind))
    digests = {run["digest"] for rs in runs.values() for run in rs}
    base = statistics.median(t for run in runs["single"] for t in run["times"])
    print(
        f"\nstatistics pass, MNIST sample ({runs['single'][0]['samples']} samples, batch {args.batch_size}),"
    )
    print(
        f"{args.repeats} repeats x {args.passes} passes, medians; "
        f"counts identical in every run: {len(digests) == 1}"
    )
    print(
        f"{'config':>8} {'pass s':>8} {'ratio':>6} {'start s':>8} {'warm-up s':>9} {'client MiB':>10} "
        f"{'worker MiB':>14}"
    )
    for config in CONFIGS:
        t = statistics.median(x for run in runs[config] for x in run["times"])
        first = runs[config][0]
        start = (
            f"{statistics.median(run['startup'] for run in runs[config]):.1f}" if "startup" in first else "-"
        )
        warm = f"{statistics.median(run['warmup'] for run in runs[config]):.2f}" if "warmup" in first else "-"
        client = max(run["client_mib"] for run in runs[config])
        workers = [max(run["worker_mib"][i] for run in runs[config]) for i in range(len(first["worker_mib"]))]
        print(
            f"{config:>8} {t:>8.3f} {t / base:>6.2f} {start:>8} {warm:>9} {client:>10.0f} "
            f"{' '.join(f'{w:.0f}' for w in workers) or '-':>14}"
        )
    measured = runs["local:2"][0]
    print(
        f"\nmoved per step on the MNIST sample: model {measured['model_bytes'] / 1024:.0f} KiB to each "
        f"worker, {measured['parts']} parts x {measured['result_bytes']} bytes back; "
        f"merge {measured['merge_per_part'] * 1e6:.0f} us per part"
    )
    for kind, label in (("refit", "reconstruction sweep"), ("guard", "guard measurement")):
        print_sweep(kind, label, sweeps[kind], args)
    if not args.no_compress:
        compress_stage(args.compress_repeats)
    print()
    for line in throughput_model(measured, args.sample_seconds, [1, 8, 32, 128]):
        print(line)
    for line in refit_guard_model(args.sample_seconds, [1, 4, 8, 32, 128]):
        print(line)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
