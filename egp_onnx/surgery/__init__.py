"""Graph surgery: turn the calibration statistics of a pruned model into a shallower graph.

Every rewrite is licensed either by algebra (exact: BatchNormalization folding, dense merges,
convolution merges without border effects, residual folds) or by the calibration statistics
(exact on the data measured: removing a ReLU whose channels never change state, zeroing the
weights of channels that are always OFF). Merges that are not exact are applied only when a
caller-supplied measurement keeps the output error within the tolerance. The rewrites live one
per module in :mod:`egp_onnx.surgery.rewrites` and register by name in
:mod:`egp_onnx.surgery.registry`; :func:`simplify` runs them to a fixed point.

Only this package imports onnx_graphsurgeon.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Collection, Mapping

import onnx

from egp_onnx.graph.ops import LAYER_OPS
from egp_onnx.graph.weights import serialized_size
from egp_onnx.surgery import registry
from egp_onnx.surgery import rewrites as rewrites  # registers every rewrite
from egp_onnx.surgery.export import export_model
from egp_onnx.surgery.surgeon import ChannelStates, Measure, Surgeon, SurgeryResult

__all__ = ["ChannelStates", "SurgeryResult", "simplify"]

#: Rewritten models of at least this many bytes make simplify run a full garbage collection.
COLLECT_BYTES = 64 * 2**20

log = logging.getLogger(__name__)


def simplify(
    model: onnx.ModelProto,
    stats: Mapping[str, ChannelStates],
    measure: Measure | None = None,
    tolerance: float = 0.0,
    skip: Collection[str] = (),
) -> SurgeryResult:
    """Rewrite ``model`` into a shallower equivalent; the input is not modified.

    Each round runs the registered rewrites in order and starts again from the first one as soon
    as one changes the graph; the rewriting stops when a round changes nothing.

    Args:
        model: the (pruned) model.
        stats: rectifier node name -> channel states measured on the calibration data.
        measure: returns the relative output error of a candidate model; used for merges that
            are not exact.
        tolerance: the largest measured error at which an inexact merge is applied (0: never).
        skip: names of registered rewrites not to run.

    Raises:
        ConfigError: ``skip`` names a rewrite that is not registered.

    """
    specs = registry.rewrites(skip)
    surgeon = Surgeon(model, stats, measure, tolerance)
    surgeon.commit()
    # Every productive rewrite deletes a node or zeroes a rectifier's dead channels (once each),
    # so this bound is never the reason to stop; it guards against a rewrite that undoes another.
    for _ in range(2 * len(surgeon.graph.nodes) + 10):
        if not any(spec.apply(surgeon) for spec in specs):
            break
    else:
        log.warning("graph surgery stopped at its round limit; the result is valid but may not be minimal")
    surgeon.commit()
    out = export_model(surgeon.graph)
    out.ir_version = model.ir_version
    del out.graph.value_info[:]
    surgeon.result.model = out
    result = surgeon.result
    # The graph is a web of cycles (every tensor knows its producers and consumers): reference
    # counting never frees it, and until the collector runs its weights stay in memory while the
    # rewritten model is checked. A full collection costs time in proportion to everything the
    # process holds, so it runs for large models only.
    del surgeon
    if serialized_size(out) >= COLLECT_BYTES:
        gc.collect()
    # Layers that no longer appear in the graph (dead branches cleaned up) are removed.
    present = {part for node in out.graph.node for part in node.name.split("+")}
    for node in model.graph.node:
        if node.op_type in LAYER_OPS and node.name not in present:
            result.states[node.name] = "removed"
    return result
