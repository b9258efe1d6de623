"""Independent references the tests compare egp-onnx against: plain onnxruntime runs, and the
numpy definitions that egp-onnx's faster code must match."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper


def run_ort(model: onnx.ModelProto, feed: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    """The one plain onnxruntime run of the suite: graph optimisation off, so nothing is fused away."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feed)


def reference_activations(model: onnx.ModelProto, tensors: list[str], feed: dict) -> dict[str, np.ndarray]:
    """Plain onnxruntime with the rectifier inputs exposed as graph outputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for t in tensors:
        exposed.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(tensors, session.run(tensors, feed), strict=True))


def spins(session) -> bool:
    try:
        return (
            session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") != "0"
        )
    except RuntimeError:  # not set: onnxruntime's default, which spins
        return True


def lexsort_prune_smallest(weights: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """prune.prune_smallest before it used a partition: a full lexsort by (|w|, seeded permutation)."""
    result = weights.copy()
    if count <= 0:
        return result
    flat = np.abs(weights.ravel())
    candidates = np.flatnonzero(flat)
    order = candidates[np.lexsort((rng.permutation(candidates.size), flat[candidates]))]
    result.reshape(-1)[order[:count]] = 0
    return result


def lexsort_global_amounts(weights: list[np.ndarray], budget: int) -> np.ndarray:
    """prune.global_magnitude_amounts before it used a partition: lexsort by (|w|, layer)."""
    nonzero = [np.abs(w[w != 0]).ravel() for w in weights]
    budget = min(int(budget), sum(v.size for v in nonzero))
    counts = np.zeros(len(weights), dtype=np.int64)
    if budget <= 0:
        return counts
    pooled = np.concatenate(nonzero)
    owner = np.concatenate([np.full(v.size, i) for i, v in enumerate(nonzero)])
    np.add.at(counts, owner[np.lexsort((owner, pooled))[:budget]], 1)
    return counts
