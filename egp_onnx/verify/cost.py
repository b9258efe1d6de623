"""Cost figures of a model: parameters, multiply-accumulates and size.

Shapes come from ONNX's shape inference at the stated input shapes; where it leaves a layer's
shape unknown (shape computations of old opsets), from one onnxruntime run of a sample.
A quantized (QDQ) model's layers read their weights through a DequantizeLinear of an integer
initializer: its MACs and parameters are counted on that initializer, as for a float weight.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Collection, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from egp_onnx.errors import EgpError
from egp_onnx.graph.weights import (
    count_parameters,
    initializer_counts,
    serialized_chunks,
    serialized_size,
    static_shapes,
)
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
    dequantized = dequantized_weights(model)
    if feed is not None:
        read = weights.keys() | dequantized.keys()  # weights, as they are or through a DequantizeLinear
        shapes.update(_measured(model, feed, _unknown(model, shapes, read)))
    dense = sparse = 0
    for node in model.graph.node:
        if node.op_type not in _COUNTED:
            continue
        if len(node.input) < 2 or node.output[0] not in shapes or node.input[0] not in shapes:
            return None
        out, inp = shapes[node.output[0]], shapes[node.input[0]]
        w_name = dequantized.get(node.input[1], node.input[1])
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
    model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], weights: Collection[str]
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


def dequantized_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Outputs of DequantizeLinear nodes that read an initializer, to that initializer's name."""
    initializers = {t.name for t in model.graph.initializer}
    return {
        node.output[0]: node.input[0]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] in initializers
    }


#: zlib's level for the deflate size: its best compression, as an archive or a bundle would pack it.
DEFLATE_LEVEL = 9
#: The report's deflate size is measured for models up to this serialised size, else None: level 9
#: walks long match chains on pruned weights (runs of zeros between random values) and compresses
#: them at about 5 MB/s of CPU on this machine (dense float32: about 17 MB/s), so a 500 MB model
#: would add minutes to a run. :func:`deflate_size` itself has no limit.
DEFLATE_MAX_BYTES = 32 * 2**20


def deflate_size(model: onnx.ModelProto) -> int:
    """Bytes of the serialised model once deflated (zlib, level 9): what a download or app bundle pays.

    The model is encoded and compressed one initializer at a time (``serialized_chunks``), so a
    large model is never held twice; the result equals ``len(zlib.compress(model.SerializeToString(), 9))``.
    """
    packer = zlib.compressobj(DEFLATE_LEVEL)
    size = 0
    for chunk in serialized_chunks(model):
        size += len(packer.compress(chunk))
    return size + len(packer.flush())


def model_cost(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]] | None,
    counts: Mapping[str, tuple[bool, int, int]] | None = None,
    feed: Mapping[str, np.ndarray] | None = None,
) -> Cost:
    """Parameters, MACs (when ``input_shapes`` is given and shapes resolve), file and deflate size.

    ``counts``: the model's :func:`egp_onnx.graph.weights.initializer_counts`, when already taken;
    ``feed``: one sample of ``input_shapes``, to measure the shapes inference cannot give.
    """
    counts = counts or initializer_counts(model)  # each weight read once for both figures
    params, nonzero = count_parameters(model, counts, quantized=set(dequantized_weights(model).values()))
    macs = count_macs(model, input_shapes, counts, feed) if input_shapes else None
    size = serialized_size(model)
    return Cost(
        params=params,
        nonzero_params=nonzero,
        macs=macs[0] if macs else None,
        nonzero_macs=macs[1] if macs else None,
        file_bytes=size,
        deflate_bytes=deflate_size(model) if size <= DEFLATE_MAX_BYTES else None,
    )
