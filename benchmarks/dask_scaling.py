"""The statistics pass and a whole compress on a Dask LocalCluster against a single process.

On the same data and the same cores, in one run, configurations interleaved (rotating order per
repeat, medians reported), each in a fresh subprocess:

- ``single``: collect_statistics in this process (two batches in flight, as egp-onnx runs it);
- ``local:1`` / ``local:2``: a LocalCluster of 1 / 2 worker processes on this machine.

A timed pass is a loop step's pass: a new model version is shared with the workers (each builds
its statistics session once), the parts run, the counts come back and are merged. The cluster's
start-up (once per run) and one warm-up pass (imports, the loaders shared once per run) are
reported apart. Peak memory: the client's and every worker's peak resident set.

Then a whole ``egp-onnx compress --no-latency`` of the MNIST sample in each configuration, the
model and report compared byte for byte; and the throughput model for ImageNet-size data.

Reconstruction's sums do not run on the cluster yet (the refit runs in the client process, the
same in every configuration): there is no reconstruction sweep to compare.

Run: python benchmarks/dask_scaling.py [--repeats 3] [--passes 3] [--no-compress]
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
CONFIGS = ("single", "local:1", "local:2")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_pass(config: str, passes: int, batch_size: int) -> dict:
    """In a fresh process: ``passes`` timed statistics passes in one configuration."""
    import numpy as np

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
                t = time.perf_counter()
                first = collect.collect_statistics(model, sites, data, batch_size, cluster=cluster)
                times.append(time.perf_counter() - t)
            peaks = cluster.client.run(_peak_mib)
            out.update(times=times, client_mib=_peak_mib(), worker_mib=sorted(peaks.values()))
            # What moves per step, measured on the objects themselves.
            parts = plan_parts(data, batch_size)
            version, shared = cluster.share(model.SerializeToString())
            args = (version, shared, sites, data.specs, data.description, cluster.share_once(data.loaders))
            one = cluster.map(
                collect.count_part, [(*args, args[-1].key, parts[0], batch_size, cluster.threads)]
            )[0]
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


def run_child(config: str, passes: int, batch_size: int) -> dict:
    """One configuration in a fresh subprocess (its own peak memory, its own cluster)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        __file__,
        "--child",
        config,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-compress", action="store_true")
    parser.add_argument("--sample-seconds", type=float, default=0.16, help="ResNet-50, one core, per image")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_pass(args.child, args.passes, args.batch_size)))
        return
    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} cores (shared with other jobs)")
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for r in range(args.repeats):
        order = CONFIGS[r % 3 :] + CONFIGS[: r % 3]
        for config in order:
            runs[config].append(run_child(config, args.passes, args.batch_size))
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
    if not args.no_compress:
        with tempfile.TemporaryDirectory() as tmp:
            results = {}
            for config in CONFIGS:
                results[config] = run_compress(config, Path(tmp))
            print("\nwhole compress --no-latency of the MNIST sample (one run each, in this order):")
            for config in CONFIGS:
                seconds, model, report = results[config]
                same = model == results["single"][1] and report == results["single"][2]
                print(
                    f"{config:>8} {seconds:>7.1f} s  ratio {seconds / results['single'][0]:.2f}  "
                    f"model and report byte-identical to single: {same}"
                )
    print()
    for line in throughput_model(measured, args.sample_seconds, [1, 8, 32, 128]):
        print(line)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
