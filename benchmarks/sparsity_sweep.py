"""EGP vs global magnitude pruning on the sample, post-training (no finetuning), one run.

Prints, per method and sparsity: test accuracy, top-1 agreement with the dense model, layers
whose rectifier has zero entropy on the calibration data, emptied layers, depth after graph
surgery (Conv/Gemm/MatMul on the longest path), and wall time.
Run: python benchmarks/sparsity_sweep.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import egp_onnx
from egp_onnx.report import format_table

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
MODEL = SAMPLES / "digits_resnet.onnx"
CALIB = SAMPLES / "digits_calib.npz"


def logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def main() -> None:
    with np.load(SAMPLES / "digits_test.npz") as test:
        x, y = test["input"], test["labels"]
    dense = logits(MODEL.read_bytes(), x).argmax(1)
    rows = [["dense", 0.0, float((dense == y).mean()), 1.0, 0, 0, 9, 0.0]]
    for method in ("egp", "magnitude"):
        for sparsity in (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
            start = time.perf_counter()
            result = egp_onnx.compress(MODEL, CALIB, sparsity=sparsity, method=method)
            seconds = time.perf_counter() - start
            pred = logits(result.model.SerializeToString(), x).argmax(1)
            layers = result.report.layers
            rows.append(
                [
                    method,
                    sparsity,
                    float((pred == y).mean()),
                    float((pred == dense).mean()),
                    sum(layer.entropy == 0 for layer in layers),
                    sum(layer.nonzero == 0 for layer in layers),
                    result.report.model.depth_after,
                    seconds,
                ]
            )
    headers = ["method", "sparsity", "accuracy", "agreement", "zero_H", "emptied", "depth", "seconds"]
    print(format_table(headers, rows))
    print(f"\n{len(y)} held-out digits; calibration {CALIB.name}; no finetuning")


if __name__ == "__main__":
    main()
