"""Weights and protobuf plumbing: read, replace and stub initializers, size and shape a model.

These functions copy or rewrite ModelProtos (never the caller's): the rest of graph/ only reads.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from egp_onnx.graph.index import attr
from egp_onnx.graph.walk import reads

log = logging.getLogger(__name__)


def initializer_arrays(
    model: onnx.ModelProto, names: list[str], writable: bool = True
) -> dict[str, np.ndarray]:
    """The named initializers as numpy arrays of their own (read-only unless ``writable``)."""
    wanted = set(names)
    # to_array reads raw_data into a new bytes object already: only writing needs another copy
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}
    return {k: v.copy() for k, v in arrays.items()} if writable else arrays


def replace_initializers(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named initializers hold ``arrays`` (dtype preserved)."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip=("graph",))
    _copy_fields(model.graph, copy.graph, skip=("initializer",))
    for tensor in model.graph.initializer:
        if tensor.name in arrays:  # written once, not copied from the old values first
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            value = np.asarray(arrays[tensor.name]).astype(dtype, copy=False)
            if (
                value.dtype.kind in "fiub"
                and sys.byteorder == "little"
                and helper.np_dtype_to_tensor_dtype(value.dtype) == tensor.data_type
            ):
                # from_array's tensor, built in place: appending one copies its bytes once more
                new = copy.graph.initializer.add()
                new.dims.extend(value.shape)
                new.data_type = tensor.data_type
                new.raw_data = np.ascontiguousarray(value).tobytes()
                new.name = tensor.name
            else:
                copy.graph.initializer.append(numpy_helper.from_array(value, tensor.name))
        else:
            copy.graph.initializer.append(tensor)
    return copy


def tensor_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializer and Constant-node values by tensor name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        value = attr(node, "value") if node.op_type == "Constant" else None
        if value is not None:
            values[node.output[0]] = numpy_helper.to_array(value)
    return values


def replace_tensors(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers and Constant nodes named in ``arrays`` hold those values.

    Raises:
        KeyError: a name is neither an initializer nor a Constant output, or a shape differs.

    """
    copy = replace_initializers(model, {k: v for k, v in arrays.items()})
    known = {t.name: tuple(t.dims) for t in copy.graph.initializer}
    for node in copy.graph.node:
        if node.op_type == "Constant" and node.output[0] in arrays:
            found = next((a for a in node.attribute if a.name == "value"), None)  # changed in place
            if found is not None:
                dtype = numpy_helper.to_array(found.t).dtype
                known[node.output[0]] = tuple(found.t.dims)
                found.t.CopyFrom(
                    numpy_helper.from_array(np.asarray(arrays[node.output[0]]).astype(dtype), node.output[0])
                )
    for name, value in arrays.items():
        if name not in known:
            raise KeyError(f"{name} is not a tensor of the model")
        if tuple(np.shape(value)) != known[name]:
            raise KeyError(f"{name} has shape {tuple(np.shape(value))}, the model's is {known[name]}")
    return copy


def count_parameters(
    model: onnx.ModelProto,
    counts: Mapping[str, tuple[bool, int, int]] | None = None,
    quantized: Collection[str] = (),
) -> tuple[int, int]:
    """(parameters, non-zero parameters) over all floating-point initializers and ``quantized``.

    ``counts`` are the model's :func:`initializer_counts`, when already taken; ``quantized``
    names integer initializers that hold weights (those a DequantizeLinear reads).
    """
    counts = initializer_counts(model) if counts is None else counts
    floating = [
        (size, nonzero) for name, (is_float, size, nonzero) in counts.items() if is_float or name in quantized
    ]
    return sum(size for size, _ in floating), sum(nonzero for _, nonzero in floating)


def initializer_counts(
    model: onnx.ModelProto, known: Mapping[str, np.ndarray] | None = None
) -> dict[str, tuple[bool, int, int]]:
    """Per initializer: (floating point, elements, non-zero elements); one pass over the weights.

    ``known``: values of initializers already read from ``model`` (see :func:`split_weights`).
    """
    counts = {}
    for tensor in model.graph.initializer:
        array = _value(tensor, known)
        counts[tensor.name] = (
            bool(np.issubdtype(array.dtype, np.floating)),
            int(array.size),
            int(np.count_nonzero(array)),
        )
    return counts


#: Initializers with more elements than this become typed inputs in a shape skeleton.
SKELETON_MAX_ELEMENTS = 64


def shape_skeleton(model: onnx.ModelProto, keep_value_info: bool = False) -> onnx.ModelProto:
    """The model without its weights, for shape inference: big initializers become typed inputs.

    Shape inference needs the weights' shapes, not their values (small integer tensors such as a
    Reshape's target stay, for data propagation), so this copy costs the graph, not the model.
    Its value_info is left out unless ``keep_value_info``.
    """
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip=("graph",))
    source, graph = model.graph, skeleton.graph
    _copy_fields(source, graph, skip=("initializer",) if keep_value_info else ("initializer", "value_info"))
    inputs = {i.name for i in source.input}
    for tensor in source.initializer:
        if int(np.prod(tensor.dims)) <= SKELETON_MAX_ELEMENTS:
            graph.initializer.append(tensor)
        elif tensor.name not in inputs:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return skeleton


#: The external-data location of a weight stub: its values are held in memory (see split_weights).
IN_MEMORY = "egp-onnx:in-memory"


def split_weights(
    model: onnx.ModelProto, always: Collection[str] = (), known: Mapping[str, np.ndarray] | None = None
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model with stubs for its large numeric initializers, and their values as arrays.

    A stub keeps the initializer's name, type and shape and marks its data as external, at
    :data:`IN_MEMORY`; onnxruntime takes the values from memory (``add_external_initializers``),
    so a session needs no serialised copy of the weights. Stubs already in ``model`` stay stubs.
    Initializers named in ``always`` become stubs whatever their size (values that will change).
    ``known`` holds values already read from ``model`` (numpy_helper.to_array's, e.g. the weights
    the loop keeps): those arrays are used instead of reading and copying the same bytes again.
    """
    stubbed = onnx.ModelProto()
    _copy_fields(model, stubbed, skip=("graph",))
    graph = stubbed.graph
    _copy_fields(model.graph, graph, skip=("initializer",))
    values: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        small = int(np.prod(tensor.dims)) <= SKELETON_MAX_ELEMENTS and tensor.name not in always
        if small or tensor.data_location == tensor.EXTERNAL:
            graph.initializer.append(tensor)
            continue
        array = _value(tensor, known)
        if array.dtype.kind not in "fiub":  # strings, bfloat16 and such stay in the protobuf
            graph.initializer.append(tensor)
            continue
        values[tensor.name] = array
        stub = graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = tensor.EXTERNAL
        stub.external_data.add(key="location", value=IN_MEMORY)
    return stubbed, values


def _value(tensor: onnx.TensorProto, known: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """The tensor's values: the known array when it has the tensor's shape and type, else read."""
    array = known.get(tensor.name) if known else None
    if (
        array is None
        or array.shape != tuple(tensor.dims)
        or array.dtype != helper.tensor_dtype_to_np_dtype(tensor.data_type)
    ):
        return numpy_helper.to_array(tensor)
    return array


#: Bytes per element of the tensor types whose raw_data has a fixed width.
_ITEM_BYTES: dict[int, int] = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1, onnx.TensorProto.COMPLEX64: 8, onnx.TensorProto.COMPLEX128: 16,
}  # fmt: skip


def serialized_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()``, without encoding the weights.

    protobuf's upb backend computes ByteSize by serialising the message, weights and all; here
    each initializer's raw_data counts as dims x item size, the rest is measured.
    """
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip=("graph",))
    if not model.HasField("graph"):
        return shell.ByteSize()
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, skip=("initializer",))
    inner = graph.ByteSize() + sum(_field_bytes(_tensor_bytes(t)) for t in model.graph.initializer)
    return shell.ByteSize() + _field_bytes(inner)


def serialized_chunks(model: onnx.ModelProto) -> Iterator[bytes]:
    """The bytes of ``model.SerializeToString()`` in pieces, one initializer at a time.

    Their concatenation is the serialised model (protobuf writes fields in field-number order;
    the graph is field 7 of ModelProto, its initializers field 5 of GraphProto), but the whole
    model is never encoded at once: a consumer that streams them (a deflate size) holds at most
    one initializer's encoding beside the model.
    """
    head, tail = onnx.ModelProto(), onnx.ModelProto()
    _copy_numbered(model, head, tail, split=7)
    if not model.HasField("graph"):
        yield head.SerializeToString() + tail.SerializeToString()
        return
    graph_head, graph_tail = onnx.GraphProto(), onnx.GraphProto()
    _copy_numbered(model.graph, graph_head, graph_tail, split=5)
    graph_bytes = graph_head.ByteSize() + graph_tail.ByteSize()
    graph_bytes += sum(_field_bytes(_tensor_bytes(t)) for t in model.graph.initializer)
    yield head.SerializeToString()
    yield _varint((7 << 3) | 2) + _varint(graph_bytes)
    yield graph_head.SerializeToString()
    for tensor in model.graph.initializer:
        encoded = tensor.SerializeToString()
        yield _varint((5 << 3) | 2) + _varint(len(encoded)) + encoded
    yield graph_tail.SerializeToString()
    yield tail.SerializeToString()


def _copy_numbered(source: Any, before: Any, after: Any, split: int) -> None:
    """Copy the set fields of ``source`` numbered below ``split`` to ``before``, above it to ``after``."""
    for field, value in source.ListFields():
        if field.number == split:
            continue
        _set_field(before if field.number < split else after, field, value)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """``tensor.ByteSize()``; raw_data is never read (reading it copies it)."""
    item = _ITEM_BYTES.get(tensor.data_type)
    if item is None or not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    head = onnx.TensorProto()
    for field in tensor.DESCRIPTOR.fields:
        if field.name == "raw_data":
            continue
        value = getattr(tensor, field.name)
        if getattr(field, "is_repeated", None) or getattr(field, "label", None) == 3:
            getattr(head, field.name).extend(value)
        elif tensor.HasField(field.name):
            if field.message_type is not None:
                getattr(head, field.name).CopyFrom(value)
            else:
                setattr(head, field.name, value)
    return head.ByteSize() + _field_bytes(int(np.prod(tensor.dims, dtype=np.int64)) * item)


def _field_bytes(length: int) -> int:
    """A length-delimited field of number < 16: one tag byte, the varint length, the payload."""
    varint = 1
    while length >= 1 << (7 * varint):
        varint += 1
    return 1 + varint + length


def _copy_fields(source: Any, target: Any, skip: tuple[str, ...]) -> None:
    """Copy every set field of a protobuf message except ``skip``."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        _set_field(target, field, value)


def _set_field(target: Any, field: Any, value: Any) -> None:
    """Set ``field`` of ``target`` to ``value``: extended if repeated, copied if a message."""
    # protobuf >= 6 has is_repeated; older versions only the label
    if getattr(field, "is_repeated", None) or getattr(field, "label", None) == 3:
        getattr(target, field.name).extend(value)
    elif field.message_type is not None:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def static_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor once the inputs have the given concrete shapes ({} if inference fails)."""
    fixed = shape_skeleton(model)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name], strict=False):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        log.info("static shape inference failed: %s", exc)
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def drop_unread(graph: onnx.GraphProto) -> None:
    """Remove the initializers of ``graph`` that no node reads (bodies included), in place.

    An initializer that is a graph output stays. A graph input named like a dropped initializer
    (IR < 4 lists initializers as inputs) goes with it: it would become a required feed.
    """
    read = {t for node in graph.node for t in reads(node)} | {o.name for o in graph.output}
    dropped = {t.name for t in graph.initializer if t.name not in read}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [v for v in graph.input if v.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
