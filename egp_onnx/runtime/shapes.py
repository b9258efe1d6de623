"""Tensor shapes measured in onnxruntime, where ONNX's shape inference leaves them unknown.

ONNX infers a tensor's shape from the shapes of the inputs, and propagates the values of shape
computations (Shape -> Slice -> Concat -> Reshape) only in recent opsets; a model exported at
opset 11 with symbolic H/W (PaddleOCR's, for one) keeps unknown shapes behind every such Reshape,
whatever the input's size. Running the model once on one sample gives every shape: a Shape node
behind each tensor asked for, so only a few int64 vectors leave the session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from egp_onnx.graph.walk import graph_names
from egp_onnx.graph.weights import split_weights
from egp_onnx.runtime.session import MEASURE, make_session, run_session


def measured_shapes(
    model: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    names: Sequence[str],
    known: Mapping[str, np.ndarray] | None = None,
) -> dict[str, tuple[int, ...]]:
    """The shapes the main-graph tensors ``names`` have when ``model`` runs ``feed``.

    ``known``: values of the model's initializers already read (see ``split_weights``).

    Raises:
        ModelError: onnxruntime cannot load the model.
        CalibrationError: onnxruntime rejects the feed.

    """
    stubbed, weights = split_weights(model, known=known)
    taken = graph_names(stubbed.graph)
    prefix, k = "egp_shape", 0
    while any(n.startswith(prefix) for n in taken):
        k += 1
        prefix = f"egp{k}_shape"
    outputs = []
    for i, name in enumerate(dict.fromkeys(names)):
        out = f"{prefix}__{i}"
        stubbed.graph.node.append(helper.make_node("Shape", [name], [out], name=out))
        stubbed.graph.output.append(helper.make_tensor_value_info(out, TensorProto.INT64, [None]))
        outputs.append((name, out))
    session = make_session(stubbed, MEASURE, weights)
    values = run_session(session, [out for _, out in outputs], dict(feed))
    return {name: tuple(int(d) for d in value) for (name, _), value in zip(outputs, values, strict=True)}
