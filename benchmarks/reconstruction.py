"""Cost of one reconstruction step against one statistics pass, and its memory in the sample count.

For each sample model, in fresh subprocesses: the statistics pass over the calibration data
(collect_statistics), and one reconstruction step after a 50% magnitude prune of every prunable
layer (reconstruct: every layer from the first pruned one on refit), each with its wall time and
peak resident memory. The data is the sample's calibration file repeated to N and 4N samples, so
that the memory columns show whether anything grows with the sample count.
Run: python benchmarks/reconstruction.py
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
SETS = {
    "digits": ("digits_resnet.onnx", "digits_calib.npz"),
    "mnist": ("mnist_resnet.onnx", "mnist_calib.npz"),
}


def worker(approach: str, model_file: str, data_file: str) -> dict:
    from egp_onnx.calibrate import collect_statistics
    from egp_onnx.data import open_calibration
    from egp_onnx.io import load_model
    from egp_onnx.loop import LayerSet
    from egp_onnx.reconstruct import reconstruct
    from egp_onnx.topology import find_rectifiers

    model = load_model(model_file)
    data = open_calibration(data_file, model)
    sites = find_rectifiers(model)
    start = time.perf_counter()
    if approach == "statistics":
        collect_statistics(model, sites, data, 32)
    else:
        layers = LayerSet(model, sites)
        remove = {n: w.size // 2 for n, w in zip(layers.weight_names, layers.weights, strict=True)}
        reconstruct(model, model, data, 32, remove=remove, masked=layers.weight_names)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(approach: str, model: Path, data: Path) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import reconstruction as r; "
    )
    code += f"print(json.dumps(r.worker({approach!r}, {str(model)!r}, {str(data)!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from egp_onnx.report import format_table

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model_file, calib_file) in SETS.items():
            with np.load(SAMPLES / calib_file) as npz:
                arrays = {k: npz[k] for k in npz.files}
            n = len(arrays["labels"])
            for factor in (1, 4):
                data = Path(tmp) / f"{name}_{factor}.npz"
                np.savez(data, **{k: np.concatenate([v] * factor) for k, v in arrays.items()})
                stats = measure("statistics", SAMPLES / model_file, data)
                refit = measure("reconstruct", SAMPLES / model_file, data)
                rows.append(
                    [
                        name,
                        n * factor,
                        stats["seconds"],
                        refit["seconds"],
                        refit["seconds"] / stats["seconds"],
                        stats["peak_mb"],
                        refit["peak_mb"],
                    ]
                )
                print(rows[-1], flush=True)
    headers = ["model", "samples", "stats_s", "refit_s", "refit/stats", "stats_MB", "refit_MB"]
    print(format_table(headers, rows))
    print(
        f"\n{platform.machine()}, Python {platform.python_version()}; one step: 50% of every prunable layer"
    )


if __name__ == "__main__":
    main()
