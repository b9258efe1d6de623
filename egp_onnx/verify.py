"""Fidelity: run a reference and a candidate model on the same data and compare their outputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from egp_onnx.calibrate import make_session
from egp_onnx.data import CalibrationData


@dataclass(frozen=True)
class Fidelity:
    """How closely a candidate reproduces a reference, over all outputs and samples."""

    rel_error: float  # ||y' - y|| / ||y|| over all outputs (L2)
    max_abs_error: float
    top1_agreement: float | None  # for outputs of shape (N, classes); None otherwise
    samples: int


def compare(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, data: CalibrationData, batch_size: int
) -> Fidelity:
    """Run both models in onnxruntime on ``data`` and measure the difference of their outputs."""
    ref_session = make_session(reference, optimize=True)
    cand_session = make_session(candidate, optimize=True)
    names = [o.name for o in ref_session.get_outputs()]
    diff_sq = ref_sq = 0.0
    max_abs = 0.0
    agree = classified = samples = 0
    for feed, _ in data.batches(batch_size):
        ref_out = ref_session.run(names, feed)
        cand_out = cand_session.run(names, feed)
        for r, c in zip(ref_out, cand_out, strict=True):
            r64, c64 = np.asarray(r, np.float64), np.asarray(c, np.float64)
            if r64.shape != c64.shape:
                return Fidelity(float("inf"), float("inf"), 0.0, samples)
            diff_sq += float(((r64 - c64) ** 2).sum())
            ref_sq += float((r64**2).sum())
            if r64.size:
                max_abs = max(max_abs, float(np.abs(r64 - c64).max()))
        first = np.asarray(ref_out[0])
        if first.ndim == 2 and first.shape[1] > 1:
            agree += int((first.argmax(1) == np.asarray(cand_out[0]).argmax(1)).sum())
            classified += first.shape[0]
        samples += next(iter(feed.values())).shape[0]
    rel = float(np.sqrt(diff_sq / ref_sq)) if ref_sq > 0 else float(np.sqrt(diff_sq))
    return Fidelity(rel, max_abs, agree / classified if classified else None, samples)
