"""Which layer owns which rectifier: pure analysis of an ONNX graph, no rewriting.

A layer is a Conv, Gemm or MatMul whose weight is an initializer. It owns a rectifier when its
output reaches the rectifier's input through per-channel affine ops only (BatchNormalization,
Identity, Add/Sub/Mul/Div by a constant) or through a residual Add, where the owner is the layer
on the deeper (non-shortcut) branch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "Gemm", "MatMul")
RECTIFIER_OPS = ("Relu",)
#: Activations that are measured and reported, but never drive pruning (more than two regions).
REPORTED_ACTIVATIONS = ("LeakyRelu", "PRelu", "Clip", "HardSwish", "HardSigmoid", "Gelu", "Elu", "Selu")
_AFFINE_UNARY = ("BatchNormalization", "Identity")
_AFFINE_BINARY = ("Add", "Sub", "Mul", "Div")


@dataclass(frozen=True)
class Layer:
    """A Conv/Gemm/MatMul node whose weight initializer egp-onnx may prune."""

    name: str
    op_type: str
    weight: str  # initializer name
    out_channels: int


@dataclass(frozen=True)
class RectifierSite:
    """An activation node, the tensor whose sign is counted, and the layer that owns it."""

    name: str
    op_type: str
    input: str
    owner: Layer | None
    channel_last: bool

    @property
    def prunable(self) -> bool:
        """Only a ReLU with an owning layer guides pruning."""
        return self.op_type in RECTIFIER_OPS and self.owner is not None


class GraphIndex:
    """Producer/consumer maps and constants of a graph, built once."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.graph_inputs = {i.name for i in graph.input if i.name not in self.initializers}
        self._depth: dict[str, int] = {}

    def is_constant(self, tensor: str) -> bool:
        """True for an initializer or the output of a Constant node."""
        if tensor in self.initializers:
            return True
        node = self.producer.get(tensor)
        return node is not None and node.op_type == "Constant"

    def depth(self, tensor: str) -> int:
        """Number of nodes on the longest path from a graph input to ``tensor``."""
        if tensor in self._depth:
            return self._depth[tensor]
        # Iterative post-order walk: graphs can be deeper than Python's recursion limit.
        stack = [tensor]
        while stack:
            current = stack[-1]
            node = self.producer.get(current)
            if node is None:
                self._depth[current] = 0
                stack.pop()
                continue
            pending = [i for i in node.input if i and i not in self._depth]
            if pending:
                stack.extend(pending)
                continue
            value = 1 + max((self._depth[i] for i in node.input if i), default=0)
            for out in node.output:
                self._depth[out] = value
            stack.pop()
        return self._depth[tensor]


def layer_of(node: onnx.NodeProto, index: GraphIndex) -> Layer | None:
    """The Layer record for a Conv/Gemm/MatMul node with an initializer weight, else None."""
    if node.op_type not in LAYER_OPS or len(node.input) < 2:
        return None
    weight = node.input[1]
    if weight not in index.initializers:
        return None
    if len(index.consumers.get(weight, [])) != 1:
        return None  # shared weights: pruning one use would change another
    dims = list(index.initializers[weight].dims)
    if node.op_type == "Conv":
        if node.input[0] in index.initializers:
            return None
        out_channels = dims[0]
    elif node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        out_channels = dims[0] if trans_b else dims[1]
    else:
        if len(dims) != 2:
            return None
        out_channels = dims[1]
    return Layer(node.name, node.op_type, weight, int(out_channels))


def _trace_owner(tensor: str, index: GraphIndex) -> Layer | None:
    """Walk back from ``tensor`` through affine ops to the layer that produces it."""
    while True:
        node = index.producer.get(tensor)
        if node is None:
            return None
        layer = layer_of(node, index)
        if layer is not None:
            return layer
        if node.op_type in _AFFINE_UNARY:
            tensor = node.input[0]
            continue
        if node.op_type in _AFFINE_BINARY and len(node.input) == 2:
            a, b = node.input
            a_const, b_const = index.is_constant(a), index.is_constant(b)
            if a_const != b_const:
                tensor = b if a_const else a
                continue
            if node.op_type == "Add" and not a_const:
                return _residual_owner(a, b, index)
        return None


def _residual_owner(a: str, b: str, index: GraphIndex) -> Layer | None:
    """Owner behind a residual Add: the layer on the deeper branch."""
    owners = [(index.depth(t), _trace_owner(t, index)) for t in (a, b)]
    candidates = [(d, o) for d, o in owners if o is not None]
    if len(candidates) == 1:
        return candidates[0][1]
    if len(candidates) == 2 and candidates[0][0] != candidates[1][0]:
        return max(candidates, key=lambda c: c[0])[1]
    return None


def find_rectifiers(model: onnx.ModelProto) -> list[RectifierSite]:
    """All activation sites of the main graph in node order, each with its owning layer."""
    index = GraphIndex(model.graph)
    sites: list[RectifierSite] = []
    for node in model.graph.node:
        if node.op_type not in RECTIFIER_OPS + REPORTED_ACTIVATIONS or not node.input:
            continue
        owner = _trace_owner(node.input[0], index)
        sites.append(
            RectifierSite(
                name=node.name,
                op_type=node.op_type,
                input=node.input[0],
                owner=owner,
                channel_last=owner is not None and owner.op_type == "MatMul",
            )
        )
    return sites


def prunable_layers(sites: list[RectifierSite]) -> dict[str, RectifierSite]:
    """Map layer name -> the first ReLU it owns; these are the layers EGP prunes."""
    result: dict[str, RectifierSite] = {}
    for site in sites:
        if site.prunable and site.owner is not None and site.owner.name not in result:
            result[site.owner.name] = site
    return result


def initializer_arrays(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Copies of the named initializers as numpy arrays."""
    wanted = set(names)
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer if t.name in wanted}


def replace_initializers(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named initializers hold ``arrays`` (dtype preserved)."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip=("graph",))
    _copy_fields(model.graph, copy.graph, skip=("initializer",))
    for tensor in model.graph.initializer:
        if tensor.name in arrays:  # written once, not copied from the old values first
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            value = np.asarray(arrays[tensor.name]).astype(dtype, copy=False)
            copy.graph.initializer.append(numpy_helper.from_array(value, tensor.name))
        else:
            copy.graph.initializer.append(tensor)
    return copy


def tensor_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializer and Constant-node values by tensor name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                values[node.output[0]] = numpy_helper.to_array(attr.t)
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
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                dtype = numpy_helper.to_array(attr.t).dtype
                known[node.output[0]] = tuple(attr.t.dims)
                attr.t.CopyFrom(
                    numpy_helper.from_array(np.asarray(arrays[node.output[0]]).astype(dtype), node.output[0])
                )
    for name, value in arrays.items():
        if name not in known:
            raise KeyError(f"{name} is not a tensor of the model")
        if tuple(np.shape(value)) != known[name]:
            raise KeyError(f"{name} has shape {tuple(np.shape(value))}, the model's is {known[name]}")
    return copy


def count_parameters(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, non-zero parameters) over all floating-point initializers."""
    total = nonzero = 0
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if not np.issubdtype(array.dtype, np.floating):
            continue
        total += array.size
        nonzero += int(np.count_nonzero(array))
    return total, nonzero


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


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model with stubs for its large numeric initializers, and their values as arrays.

    A stub keeps the initializer's name, type and shape and marks its data as external, at
    :data:`IN_MEMORY`; onnxruntime takes the values from memory (``add_external_initializers``),
    so a session needs no serialised copy of the weights. Stubs already in ``model`` stay stubs.
    """
    stubbed = onnx.ModelProto()
    _copy_fields(model, stubbed, skip=("graph",))
    graph = stubbed.graph
    _copy_fields(model.graph, graph, skip=("initializer",))
    values: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims)) <= SKELETON_MAX_ELEMENTS or tensor.data_location == tensor.EXTERNAL:
            graph.initializer.append(tensor)
            continue
        array = numpy_helper.to_array(tensor)
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


def _copy_fields(source: Any, target: Any, skip: tuple[str, ...]) -> None:
    """Copy every set field of a protobuf message except ``skip``."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
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
