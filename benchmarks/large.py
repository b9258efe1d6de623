"""A VGG-19-class model (143.7 M parameters, 575 MB): `egp-onnx compress --sparsity 0.5` end to end.

The model is the onnx package's light-zoo VGG-19 with seeded random weights (models.vgg19); the
calibration data is random, seeded. Both runs pass --no-guard: with random weights and random
data the guard would compare meaningless argmaxes (top-1 agreement on 4 held-out samples of
noise), roll every step back and write nothing. The runs are the default pipeline without the
guard (reconstruction, surgery, latency) and the same with --no-reconstruct. Prints, for each run,
the whole-process wall time (start-up and writing the output included) and the peak resident
memory as a multiple of the model's size; then the selection alone on one 25088x4096 layer
(fc6), and with --old the lexsort it replaced. The machine is shared: the load average is
printed with the figures.

Run: python benchmarks/large.py [--samples 8] [--batch-size 4] [--runs 1] [--old]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def compress_run(
    model: Path, calib: Path, out: Path, batch_size: int, extra: list[str]
) -> tuple[float, float]:
    """(wall seconds, peak resident GB) of one `egp-onnx compress` process."""
    script = (
        "import resource, runpy, sys\n"
        "sys.argv = ['egp-onnx', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('egp_onnx', run_name='__main__')\n"
        "finally:\n"
        "    print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    cmd = [sys.executable, "-c", script, "compress", str(model), "--calib", str(calib), "-o", str(out)]
    cmd += ["--sparsity", "0.5", "--batch-size", str(batch_size), "--force", "--quiet", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    peak_kb = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("peak_kb"))
    return seconds, peak_kb / 1024**2


def lexsort_prune(weights: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """The selection before the partition: a full lexsort by (|w|, seeded permutation)."""
    result = weights.copy()
    flat = np.abs(weights.ravel())
    candidates = np.flatnonzero(flat)
    order = candidates[np.lexsort((rng.permutation(candidates.size), flat[candidates]))]
    result.reshape(-1)[order[:count]] = 0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--old", action="store_true", help="also time the old lexsort selection")
    args = parser.parse_args()
    from models import vgg19

    from egp_onnx.prune.budget import prune_smallest
    from egp_onnx.report.render import format_table

    folder = Path(tempfile.mkdtemp(prefix="egp-large-"))
    model, calib = folder / "vgg19.onnx", folder / "calib.npz"
    proto = vgg19()
    onnx.save(proto, str(model))
    model_gb = model.stat().st_size / 1024**3
    del proto
    x = np.random.default_rng(0).normal(size=(args.samples, 3, 224, 224)).astype(np.float32)
    np.savez(calib, data_0=x)
    rows = []
    for _ in range(args.runs):
        for label, extra in (
            ("--no-guard", ["--no-guard"]),
            ("--no-guard --no-reconstruct", ["--no-guard", "--no-reconstruct"]),
        ):
            seconds, peak = compress_run(model, calib, folder / "out.onnx", args.batch_size, extra)
            rows.append([label, seconds, peak, peak / model_gb, os.getloadavg()[0]])
    print(
        f"egp-onnx compress --sparsity 0.5 of VGG-19 ({model_gb:.2f} GB), {args.samples} calibration "
        f"samples at batch {args.batch_size}, whole process (no guard: random weights and data make "
        "its top-1 agreement meaningless):"
    )
    print(format_table(["run", "seconds", "peak_GB", "peak/model", "load_avg"], rows))
    layer = np.random.default_rng(1).standard_normal((4096, 25088), dtype=np.float32)
    start = time.perf_counter()
    prune_smallest(layer, layer.size // 2, np.random.default_rng(0))
    partition = time.perf_counter() - start
    print(f"\nselection of half of one 25088x4096 layer: {partition:.1f} s", end="")
    if args.old:
        start = time.perf_counter()
        lexsort_prune(layer, layer.size // 2, np.random.default_rng(0))
        print(f" (lexsort: {time.perf_counter() - start:.1f} s)", end="")
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"onnxruntime {__import__('onnxruntime').__version__}; load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
