"""A graph-surgeon graph back to ONNX, with each weight's bytes copied once instead of four times.

``gs.export_onnx`` turns a constant's array into bytes (``tobytes``), a tensor (``make_tensor``),
then ``make_graph`` and ``make_model`` copy every initializer again, a cost in proportion to the
model. Here the exporter gets value-less stubs of the large constants, and their bytes go into the
exported initializers afterwards: the same message, field for field.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

#: Constants with at most this many elements go through gs's own exporter unchanged.
SMALL_ELEMENTS = 64


def export_model(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx(graph)``, with the large constants' bytes written once into the result."""
    swapped: dict[str, tuple[gs.Constant, object, onnx.TensorProto | np.ndarray]] = {}
    for tensor in graph.tensors().values():
        source = _source(tensor)
        if source is not None:
            # gs keeps a constant's values in _values: a LazyValues over the imported tensor, or
            # an array; its exporter copies a LazyValues' tensor as it is (the stub, here)
            swapped[tensor.name] = (tensor, tensor._values, source)
            tensor._values = LazyValues(_stub(tensor, source))
    try:
        model = gs.export_onnx(graph)
    finally:
        for tensor, values, _ in swapped.values():
            tensor._values = values
    for initializer in model.graph.initializer:
        if initializer.name in swapped:
            source = swapped[initializer.name][2]
            if isinstance(source, np.ndarray):
                initializer.raw_data = source.tobytes()
            else:
                initializer.CopyFrom(source)
                initializer.name = swapped[initializer.name][0].name  # as gs's exporter names it
    return model


def _source(tensor: gs.Tensor) -> onnx.TensorProto | np.ndarray | None:
    """Where a large constant's bytes come from: its imported tensor or its array; None: leave it to gs."""
    if not isinstance(tensor, gs.Constant) or tensor.data_location is not None:
        return None
    values = tensor._values
    if isinstance(values, LazyValues):
        source = values.tensor
        large = isinstance(source, onnx.TensorProto) and int(np.prod(source.dims)) > SMALL_ELEMENTS
        return source if large and source.HasField("raw_data") else None
    if (
        isinstance(values, np.ndarray)
        and values.size > SMALL_ELEMENTS
        and values.dtype.kind in "fiub"
        and tensor.export_dtype == values.dtype
    ):
        return values
    return None


def _stub(tensor: gs.Constant, source: onnx.TensorProto | np.ndarray) -> onnx.TensorProto:
    """The exported initializer without its bytes.

    For an array, the fields make_tensor(name, type, shape, bytes, raw=True) sets; for an imported
    tensor, its name, type and shape (it is copied whole afterwards).
    """
    stub = onnx.TensorProto()
    if isinstance(source, np.ndarray):
        stub.data_type = onnx.helper.np_dtype_to_tensor_dtype(source.dtype)
        stub.dims.extend(source.shape)
    else:
        stub.data_type = source.data_type
        stub.dims.extend(source.dims)
    stub.name = tensor.name
    return stub
