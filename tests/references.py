"""Independent references the tests compare egp-onnx against: plain onnxruntime runs, and the
numpy definitions that egp-onnx's faster code must match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper


def run_ort(
    model: onnx.ModelProto | str | Path,
    feed: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    *,
    batch: int | None = None,
    optimize: bool = False,
) -> list[np.ndarray]:
    """The one plain onnxruntime run of the suite: graph optimisation off, so nothing is fused away.

    Args:
        model: the model, or the path of a model file (its external data is read beside it).
        feed: input name -> array.
        outputs: the output names to return, in order; all of the graph's outputs when None.
        batch: run the feed in chunks of this many samples and concatenate (a model with a fixed
            batch size, or a test set too large for one run); one run when None.
        optimize: all of onnxruntime's graph optimisations on: for a test that compares against an
            optimised session on purpose, or measures a shipped model as a user's session runs it.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    n = len(next(iter(feed.values())))
    if batch is None or batch >= n:
        return session.run(outputs, feed)
    parts = [session.run(outputs, {k: v[i : i + batch] for k, v in feed.items()}) for i in range(0, n, batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def reference_activations(model: onnx.ModelProto, tensors: list[str], feed: dict) -> dict[str, np.ndarray]:
    """Plain onnxruntime (run_ort) with exactly ``tensors`` as the graph outputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    return dict(zip(tensors, run_ort(exposed, feed, tensors), strict=True))


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
