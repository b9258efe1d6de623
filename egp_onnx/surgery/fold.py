"""Constant folding at load time, by onnx-graphsurgeon (which evaluates with onnxruntime).

It lives in surgery/ because only this package imports onnx_graphsurgeon; the load-time stage
that calls it is :mod:`egp_onnx.load.normalize`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)


@contextmanager
def _quiet_graphsurgeon() -> Iterator[None]:
    """graph-surgeon logs warnings (large folded tensors, missing colours) to stdout: silence them."""
    logger = gs.logger.G_LOGGER
    severity = logger.severity
    logger.severity = logger.CRITICAL
    try:
        yield
    finally:
        logger.severity = severity


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which every all-constant subexpression is an initializer.

    Constant and ConstantOfShape nodes, and nodes whose inputs are all constant (an Unsqueeze or
    Mul/Add chain of initializers, a weight computed from others), are evaluated once and
    replaced by initializers; subgraph bodies are folded too and keep reading the outer scope.

    Raises:
        Exception: whatever onnx-graphsurgeon or onnxruntime raise on a graph they cannot fold.

    """
    with _quiet_graphsurgeon():
        graph = gs.import_onnx(model)
        graph.fold_constants(error_ok=False).cleanup(remove_unused_graph_inputs=False).toposort()
        out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field, getattr(model, field))
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    del out.functions[:]
    out.functions.extend(model.functions)
    return out
