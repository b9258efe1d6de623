"""Cost figures of a model: parameters, multiply-accumulates and size.

Shapes come from ONNX's shape inference at the stated input shapes; where it leaves a layer's
shape unknown (shape computations of old opsets), from one onnxruntime run of a sample.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from egp_onnx.errors import EgpError
from egp_onnx.graph.weights import count_parameters, initializer_counts, serialized_size, static_shapes
from egp_onnx.report.records import Cost
from egp_onnx.runtime.shapes import measured_shapes

log = logging.getLogger(__name__)

#: The ops whose multiply-accumulates are counted.
_COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def count_macs(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]],
    counts: Mapping[str, tuple[bool, int, int]] | None = None,
    feed: Mapping[str, np.ndarray] | None = None,
) -> tuple[int, int] | None:
    """(dense MACs, non-zero-weight MACs) for one sample; None when a shape stays unknown.

    ``input_shapes`` gives each input's shape with batch size 1; ``counts`` are the model's
    :func:`egp_onnx.graph.weights.initializer_counts`, when already taken. ``feed``, one sample
    of those shapes: the shapes inference leaves unknown are measured by running it.
    """
    shapes = static_shapes(model, input_shapes)
    weights = {t.name: t for t in model.graph.initializer}
    if feed is not None:
        shapes.update(_measured(model, feed, _unknown(model, shapes, weights)))
    dense = sparse = 0
    for node in model.graph.node:
        if node.op_type not in _COUNTED:
            continue
        if len(node.input) < 2 or node.output[0] not in shapes or node.input[0] not in shapes:
            return None
        out, inp = shapes[node.output[0]], shapes[node.input[0]]
        w_name = node.input[1]
        if w_name in weights and counts is not None:
            _, size, nnz = counts[w_name]
        elif w_name in weights:
            w = numpy_helper.to_array(weights[w_name])
            size, nnz = w.size, int(np.count_nonzero(w))
        elif w_name in shapes and node.op_type == "MatMul":
            size = nnz = int(np.prod(shapes[w_name][-2:]))  # activation x activation
        else:
            return None
        if node.op_type == "Conv":
            uses = int(np.prod(out[2:]))  # each weight is used once per output position
        elif node.op_type == "ConvTranspose":
            uses = int(np.prod(inp[2:]))
        elif node.op_type == "Gemm":
            uses = out[0]
        else:
            uses = int(np.prod(out[:-2])) * out[-2] if len(out) >= 2 else 1
        batch = out[0] if node.op_type in ("Conv", "ConvTranspose") else 1
        dense += size * uses * batch
        sparse += nnz * uses * batch
    return dense, sparse


def _unknown(
    model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], weights: Mapping[str, onnx.TensorProto]
) -> list[str]:
    """The inputs and outputs of the counted layers whose shapes are not in ``shapes``."""
    needed = []
    for node in model.graph.node:
        if node.op_type in _COUNTED and len(node.input) >= 2:
            needed += [node.input[0], node.output[0]]
            if node.input[1] not in weights:
                needed.append(node.input[1])
    return [name for name in dict.fromkeys(needed) if name and name not in shapes]


def _measured(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray], names: list[str]
) -> dict[str, tuple[int, ...]]:
    """``names``' shapes on ``feed`` in onnxruntime ({} when none is asked for or the run fails)."""
    if not names:
        return {}
    try:
        return measured_shapes(model, feed, names)
    except EgpError as exc:  # the MACs stay unknown; the run goes on
        log.info("shapes not measured: %s", exc)
        return {}


def model_cost(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]] | None,
    counts: Mapping[str, tuple[bool, int, int]] | None = None,
    feed: Mapping[str, np.ndarray] | None = None,
) -> Cost:
    """Parameters, MACs (when ``input_shapes`` is given and shapes resolve) and file size.

    ``counts``: the model's :func:`egp_onnx.graph.weights.initializer_counts`, when already taken;
    ``feed``: one sample of ``input_shapes``, to measure the shapes inference cannot give.
    """
    counts = counts or initializer_counts(model)  # each weight read once for both figures
    params, nonzero = count_parameters(model, counts)
    macs = count_macs(model, input_shapes, counts, feed) if input_shapes else None
    return Cost(
        params=params,
        nonzero_params=nonzero,
        macs=macs[0] if macs else None,
        nonzero_macs=macs[1] if macs else None,
        file_bytes=serialized_size(model),
    )
