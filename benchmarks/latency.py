"""CPU latency of original vs compressed models, and the end-to-end time of `egp-onnx compress`.

First the check that the measurement can be trusted: each model against an identical copy of
itself (two sessions of the same bytes), which must agree within 5%. Then the sample (at the
sparsities of the README) and the generated ResNet, original vs compressed, at batch 1 and 32:
egp_onnx.verify.latency.compare_latency (the same measurement `compress` reports: both sessions
optimised alike, warm-up, runs alternating between the two models until a time budget or a run
count, median and interquartile range). Then the wall time of `egp-onnx compress` on the sample,
start-up included. One run prints everything; the figures are ratios measured in that run.

Run: python benchmarks/latency.py [--budget 2.0] [--max-runs 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import egp_onnx
from egp_onnx.report.records import CompressionReport, LatencyRecord
from egp_onnx.report.render import format_table
from egp_onnx.verify.latency import compare_latency

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "sample_models"
sys.path.insert(0, str(HERE))


def cases(folder: Path) -> list[tuple[str, onnx.ModelProto, onnx.ModelProto, dict, CompressionReport]]:
    """(name, original, compressed, input shapes without batch, report)."""
    from models import resnet

    out = []
    sample = onnx.load(str(SAMPLES / "digits_resnet.onnx"))
    for sparsity in (0.5, 0.9):
        result = egp_onnx.compress(sample, SAMPLES / "digits_calib.npz", sparsity=sparsity, latency=False)
        out.append((f"digits_resnet@{sparsity}", sample, result.model, {"input": (1, 8, 8)}, result.report))
    net = resnet()
    rng = np.random.default_rng(0)
    np.savez(folder / "resnet_calib.npz", x=rng.normal(size=(256, 3, 32, 32)).astype(np.float32))
    result = egp_onnx.compress(net, folder / "resnet_calib.npz", sparsity=0.9, latency=False)
    out.append(("resnet4x32@0.9", net, result.model, {"x": (3, 32, 32)}, result.report))
    return out


def measured_columns(t: LatencyRecord) -> list:
    """runs, median and IQR of each side, and their ratio."""
    return [t.runs, t.median_ms_before, t.iqr_ms_before, t.median_ms_after, t.iqr_ms_after, t.speedup]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed runs per batch size")
    parser.add_argument("--max-runs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="identical-model measurements per case")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="egp-latency-"))
    rng = np.random.default_rng(1)
    measured = cases(folder)
    same_rows, worst = [], 0.0
    for name, original, _, shapes, _ in measured[1:]:  # the sample once, and the ResNet
        for batch in (1, 32):
            feed = {k: rng.normal(size=(batch, *s)).astype(np.float32) for k, s in shapes.items()}
            for _ in range(args.repeats):
                copy = onnx.ModelProto()
                copy.CopyFrom(original)
                t = compare_latency(original, copy, [feed], args.budget, args.max_runs).batches[0]
                worst = max(worst, abs(t.speedup - 1.0))
                same_rows.append([name.split("@")[0], batch, *measured_columns(t)])
    print("identical models (a model against a copy of itself):")
    print(format_table(["model", "batch", "runs", "ms_a", "iqr_a", "ms_b", "iqr_b", "a/b"], same_rows))
    print(f"largest disagreement {worst:.1%} (target: within 5%)\n")
    rows = []
    for name, original, compressed, shapes, report in measured:
        feeds = [
            {k: rng.normal(size=(batch, *s)).astype(np.float32) for k, s in shapes.items()}
            for batch in (1, 32)
        ]
        timing = compare_latency(original, compressed, feeds, args.budget, args.max_runs)
        for t in timing.batches:
            rows.append(
                [
                    name,
                    t.batch_size,
                    report.model.depth_before,
                    report.model.depth_after,
                    *measured_columns(t),
                ]
            )
    headers = [
        "model",
        "batch",
        "depth_before",
        "depth_after",
        "runs",
        "ms_before",
        "iqr_before",
        "ms_after",
        "iqr_after",
        "speed-up",
    ]
    print(format_table(headers, rows))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "egp_onnx",
                "compress",
                str(SAMPLES / "digits_resnet.onnx"),
                "--calib",
                str(SAMPLES / "digits_calib.npz"),
                "-o",
                str(folder / "small.onnx"),
                "--sparsity",
                "0.9",
                "--eval",
                str(SAMPLES / "digits_test.npz"),
                "--force",
                "--quiet",
            ],
            check=True,
        )
        times.append(time.perf_counter() - start)
    print(
        f"\negp-onnx compress on the sample (0.9, --eval, whole process): "
        f"median {np.median(times):.2f} s of 3"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"onnxruntime {__import__('onnxruntime').__version__}; runs alternate between the two models "
        f"for {args.budget} s per batch size (at most {args.max_runs}), after a warm-up; "
        f"load average at the end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
