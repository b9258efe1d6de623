"""CPU latency of original vs compressed models, and the end-to-end time of `egp-onnx compress`.

For the sample (at the sparsities of the README) and the generated ResNet, at batch 1 and 32:
the median of repeated onnxruntime runs (optimised session, this machine's default threads),
with the depth before and after. Then the wall time of `egp-onnx compress` on the sample,
start-up included. One run prints everything; the figures are ratios measured in that run.

Run: python benchmarks/latency.py [--runs 200]
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
from egp_onnx.report import CompressionReport, format_table
from egp_onnx.verify import measure_latency

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="egp-latency-"))
    rng = np.random.default_rng(1)
    rows = []
    for name, original, compressed, shapes, report in cases(folder):
        for batch in (1, 32):
            feed = {k: rng.normal(size=(batch, *s)).astype(np.float32) for k, s in shapes.items()}
            before = measure_latency(original, feed, runs=args.runs, warmup=20)
            after = measure_latency(compressed, feed, runs=args.runs, warmup=20)
            rows.append(
                [
                    name,
                    batch,
                    report.model.depth_before,
                    report.model.depth_after,
                    before,
                    after,
                    before / after,
                ]
            )
    print(
        format_table(
            ["model", "batch", "depth_before", "depth_after", "ms_before", "ms_after", "speed-up"], rows
        )
    )
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
        f"onnxruntime {__import__('onnxruntime').__version__}; "
        f"median of {args.runs} runs after 20 warm-up runs"
    )


if __name__ == "__main__":
    main()
