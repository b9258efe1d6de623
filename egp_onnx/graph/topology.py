"""Which layer owns which rectifier: pure analysis of an ONNX graph, no rewriting.

A layer is a Conv, Gemm or MatMul whose weight is an initializer. It owns a rectifier when its
output reaches the rectifier's input through per-channel affine ops only (BatchNormalization,
Identity, Add/Sub/Mul/Div by a constant, so also a BatchNormalization written as Mul/Add) or
through a residual Add or 2-input Sum, where the owner is the layer on the deeper (non-shortcut)
branch; after a channel Concat, each input's channels are owned by that input's producer.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "Gemm", "MatMul")
#: The rectifier family, by the name a site reports: ONNX ops, or decomposed forms (SiLU is
#: x * Sigmoid(x); HardSwish also x * HardSigmoid(x) and x * Clip(x + 3, 0, 6) / 6; Gelu also the
#: Erf form). For each, ON = input > 0 drives entropy and the budget; a Clip belongs to the family
#: only as ReLU6 (min 0).
RECTIFIER_OPS = ("Relu", "Clip", "LeakyRelu", "PRelu", "HardSwish", "SiLU", "Gelu")
#: Activations that are measured and reported, but never drive pruning.
REPORTED_ACTIVATIONS = ("HardSigmoid", "Elu", "Selu")
#: Kinds whose exactly linear regions let surgery remove the activation (see surgery/rewrites.py).
REMOVABLE_KINDS = ("relu", "relu6", "leaky_relu", "prelu")
_KINDS = {
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "PRelu": "prelu",
    "HardSwish": "hardswish",
    "SiLU": "silu",
    "Gelu": "gelu",
}
_AFFINE_UNARY = ("BatchNormalization", "Identity", "Dropout")
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
    """An activation, the tensor whose sign is counted, and the layer that owns it.

    After a channel Concat each input's channels are owned by that input's producer: the
    activation then gives one site per slice, named ``node[start:stop]``, with ``channels`` set.
    """

    name: str  # unique key of the site: the activation node's name, or node[start:stop]
    op_type: str  # Relu, Clip, LeakyRelu, PRelu, HardSwish, SiLU, Gelu, or a reported op
    input: str  # z: ON = z > 0
    owner: Layer | None
    channel_last: bool
    node: str = ""  # the activation node (for a decomposed form: its last node); "" = name
    channels: tuple[int, int] | None = None  # the slice of z's channels this site covers
    kind: str = ""  # relu, relu6, leaky_relu, prelu, hardswish, silu, gelu; "" = reported only

    def __post_init__(self) -> None:
        if not self.node:
            object.__setattr__(self, "node", self.name)

    @property
    def prunable(self) -> bool:
        """A member of the rectifier family with an owning layer guides pruning."""
        return bool(self.kind) and self.owner is not None


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
        self.shapes: dict[str, list[int | None]] = {}
        for value in [*graph.value_info, *graph.input, *graph.output]:
            if value.type.tensor_type.HasField("shape"):
                dims = value.type.tensor_type.shape.dim
                self.shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        self._depth: dict[str, int] = {}

    def is_constant(self, tensor: str) -> bool:
        """True for an initializer or the output of a Constant node."""
        if tensor in self.initializers:
            return True
        node = self.producer.get(tensor)
        return node is not None and node.op_type == "Constant"

    def value(self, tensor: str) -> np.ndarray | None:
        """The value of a constant tensor, None for a variable."""
        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            return None if attr is None else numpy_helper.to_array(attr.t)
        return None

    def channels(self, tensor: str) -> int | None:
        """Size of axis 1 of ``tensor`` when shape inference fixed it."""
        dims = self.shapes.get(tensor)
        return dims[1] if dims and len(dims) >= 2 else None

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


def _is_residual_add(node: onnx.NodeProto) -> bool:
    return node.op_type in ("Add", "Sum") and len(node.input) == 2


def _channel_concat(node: onnx.NodeProto, index: GraphIndex) -> bool:
    if node.op_type != "Concat":
        return False
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    rank = len(index.shapes.get(node.output[0], [])) or None
    return axis == 1 or (rank is not None and axis + rank == 1)


def _trace(tensor: str, index: GraphIndex) -> Layer | onnx.NodeProto | None:
    """Walk back from ``tensor`` through affine ops to the layer (or channel Concat) behind it."""
    while True:
        node = index.producer.get(tensor)
        if node is None:
            return None
        layer = layer_of(node, index)
        if layer is not None:
            return layer
        if _channel_concat(node, index):
            return node
        if node.op_type in _AFFINE_UNARY or (node.op_type == "Sum" and len(node.input) == 1):
            tensor = node.input[0]
            continue
        if node.op_type in _AFFINE_BINARY + ("Sum",) and len(node.input) == 2:
            a, b = node.input
            a_const, b_const = index.is_constant(a), index.is_constant(b)
            if a_const != b_const and node.op_type != "Sum":
                tensor = b if a_const else a
                continue
            if _is_residual_add(node) and not a_const:
                return _residual_owner(a, b, index)
        return None


def _trace_owner(tensor: str, index: GraphIndex) -> Layer | None:
    """The layer that produces ``tensor`` through affine ops and residual adds, if any."""
    found = _trace(tensor, index)
    return found if isinstance(found, Layer) else None


def _residual_owner(a: str, b: str, index: GraphIndex) -> Layer | None:
    """Owner behind a residual Add: the layer on the deeper branch."""
    owners = [(index.depth(t), _trace_owner(t, index)) for t in (a, b)]
    candidates = [(d, o) for d, o in owners if o is not None]
    if len(candidates) == 1:
        return candidates[0][1]
    if len(candidates) == 2 and candidates[0][0] != candidates[1][0]:
        return max(candidates, key=lambda c: c[0])[1]
    return None


def _concat_slices(node: onnx.NodeProto, index: GraphIndex) -> list[tuple[int, int, Layer | None]] | None:
    """(start, stop, owner) of every input of a channel Concat, nested Concats flattened."""
    slices: list[tuple[int, int, Layer | None]] = []
    start = 0
    for tensor in node.input:
        width = index.channels(tensor)
        if width is None:
            return None
        found = _trace(tensor, index)
        if isinstance(found, onnx.NodeProto):
            inner = _concat_slices(found, index)
            if inner is None:
                return None
            slices.extend((start + a, start + b, owner) for a, b, owner in inner)
        else:
            owner = found if found is not None and found.out_channels == width else None
            slices.append((start, start + width, owner))
        start += width
    return slices


def _scalar(index: GraphIndex, tensor: str) -> float | None:
    value = index.value(tensor) if tensor else None
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _clip_min(node: onnx.NodeProto, index: GraphIndex) -> float | None:
    """The lower bound of a Clip (attribute before opset 11, input after), None when not constant."""
    attr = next((a for a in node.attribute if a.name == "min"), None)
    if attr is not None:
        return float(attr.f)
    if len(node.input) > 1 and node.input[1]:
        return _scalar(index, node.input[1])
    return None


def _hard_sigmoid_of(tensor: str, x: str, index: GraphIndex) -> bool:
    """True when ``tensor`` is relu6(x + 3) / 6 in any of the written forms, or HardSigmoid(x)."""
    node = index.producer.get(tensor)
    if node is None:
        return False
    if node.op_type == "HardSigmoid":
        return node.input[0] == x
    if node.op_type in ("Div", "Mul") and len(node.input) == 2:
        inner = next((t for t in node.input if not index.is_constant(t)), None)
        return inner is not None and _relu6_of_x_plus_3(inner, x, index)
    return False


def _relu6_of_x_plus_3(tensor: str, x: str, index: GraphIndex) -> bool:
    node = index.producer.get(tensor)
    if node is None or node.op_type != "Clip" or _clip_min(node, index) != 0.0:
        return False
    add = index.producer.get(node.input[0])
    return (
        add is not None
        and add.op_type == "Add"
        and x in add.input
        and any(_scalar(index, t) == 3.0 for t in add.input)
    )


def _decomposed(node: onnx.NodeProto, index: GraphIndex) -> tuple[str, str, set[str]] | None:
    """(op_type, input x, inner nodes) when ``node`` ends a decomposed SiLU/HardSwish/Gelu."""
    if node.op_type == "Erf":
        scaled = index.producer.get(node.input[0])
        if scaled is not None and scaled.op_type in ("Div", "Mul") and len(scaled.input) == 2:
            x = next((t for t in scaled.input if not index.is_constant(t)), None)
            if x is not None:
                return "Gelu", x, set()
        return None
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    a, b = node.input
    for x, gate in ((a, b), (b, a)):
        if node.op_type == "Div" or index.is_constant(x):
            continue
        producer = index.producer.get(gate)
        if producer is not None and producer.op_type == "Sigmoid" and producer.input[0] == x:
            return "SiLU", x, {producer.name}
        if _hard_sigmoid_of(gate, x, index):
            return "HardSwish", x, _gate_nodes(gate, index)
        if _relu6_of_x_plus_3(gate, x, index):  # (x * relu6(x + 3)) / 6: the Mul ends it
            return "HardSwish", x, _gate_nodes(gate, index)
    return None


def _gate_nodes(gate: str, index: GraphIndex) -> set[str]:
    """Names of the HardSigmoid, or the [Div/Mul ->] Clip -> Add(x, 3), nodes of a HardSwish gate."""
    node = index.producer.get(gate)
    names: set[str] = set()
    if node is not None and node.op_type in ("Div", "Mul"):
        names.add(node.name)
        inner = next((t for t in node.input if not index.is_constant(t)), "")
        node = index.producer.get(inner)
    if node is not None and node.op_type in ("HardSigmoid", "Clip"):
        names.add(node.name)
        add = index.producer.get(node.input[0]) if node.op_type == "Clip" else None
        if add is not None and add.op_type == "Add":
            names.add(add.name)
    return names


def _activation(node: onnx.NodeProto, index: GraphIndex) -> tuple[str, str, str] | None:
    """(op_type, input, kind) of an activation node; kind "" for reported-only ones."""
    if not node.input:
        return None
    if node.op_type in _KINDS:
        return node.op_type, node.input[0], _KINDS[node.op_type]
    if node.op_type == "Clip":
        return "Clip", node.input[0], "relu6" if _clip_min(node, index) == 0.0 else ""
    if node.op_type in REPORTED_ACTIVATIONS:
        return node.op_type, node.input[0], ""
    decomposed = _decomposed(node, index)
    if decomposed is not None:
        op_type, x, _ = decomposed
        return op_type, x, _KINDS[op_type]
    return None


def find_rectifiers(model: onnx.ModelProto) -> list[RectifierSite]:
    """All activation sites of the main graph in node order, each with its owning layer(s)."""
    index = GraphIndex(model.graph)
    inner: set[str] = set()
    for node in model.graph.node:
        decomposed = _decomposed(node, index)
        if decomposed is not None:
            inner |= decomposed[2]
    sites: list[RectifierSite] = []
    for node in model.graph.node:
        found = _activation(node, index) if node.name not in inner else None
        if found is None:
            continue
        op_type, z, kind = found
        traced = _trace(z, index)
        if isinstance(traced, onnx.NodeProto):
            slices = _concat_slices(traced, index)
            if slices is not None and any(owner is not None for _, _, owner in slices):
                sites.extend(
                    RectifierSite(f"{node.name}[{a}:{b}]", op_type, z, owner, False, node.name, (a, b), kind)
                    for a, b, owner in slices
                )
                continue
            traced = None
        owner = traced
        sites.append(
            RectifierSite(
                name=node.name,
                op_type=op_type,
                input=z,
                owner=owner,
                channel_last=owner is not None and owner.op_type == "MatMul",
                kind=kind,
            )
        )
    return sites


def prunable_layers(sites: list[RectifierSite]) -> dict[str, RectifierSite]:
    """Map layer name -> the first rectifier (or rectifier slice) it owns; these are pruned."""
    result: dict[str, RectifierSite] = {}
    for site in sites:
        if site.prunable and site.owner is not None and site.owner.name not in result:
            result[site.owner.name] = site
    return result


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


def count_parameters(
    model: onnx.ModelProto, counts: Mapping[str, tuple[bool, int, int]] | None = None
) -> tuple[int, int]:
    """(parameters, non-zero parameters) over all floating-point initializers.

    ``counts`` are the model's :func:`initializer_counts`, when already taken.
    """
    counts = initializer_counts(model) if counts is None else counts
    floating = [(size, nonzero) for is_float, size, nonzero in counts.values() if is_float]
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

    protobuf's upb backend computes ByteSize by serialising the message (2-3 s for a 575 MB
    model); here each initializer's raw_data counts as dims x item size, the rest is measured.
    """
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip=("graph",))
    if not model.HasField("graph"):
        return shell.ByteSize()
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, skip=("initializer",))
    inner = graph.ByteSize() + sum(_field_bytes(_tensor_bytes(t)) for t in model.graph.initializer)
    return shell.ByteSize() + _field_bytes(inner)


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
