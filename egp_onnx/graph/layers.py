"""The one recogniser of a prunable linear layer, its geometry for refit, and the affine-chain walks.

A layer is a Conv, Gemm or MatMul (graph/ops.py's LAYER_KINDS) whose weight is a constant read by
that node only and whose first input is not a constant (:func:`layer_kind`, for ONNX and
graph-surgeon nodes alike). What may be done with a layer is a capability of its kind: every layer
may be pruned; refit needs the geometry :func:`linear_layers` reads (float weights, a private
initializer bias, the kind's ``geometry``); surgery needs the kind's ``rewritable`` attributes.

A layer owns the tensors its output reaches through per-channel affine ops (graph/affine.py) or
through a residual Add or 2-input Sum, where the owner is the layer on the deeper (non-shortcut)
branch: :func:`trace` walks such a chain backward. :func:`residual_of` walks it forward from a
layer's output to a residual Add and composes the chain's scale and shift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from egp_onnx.graph import affine
from egp_onnx.graph.index import GraphIndex, attr, attrs
from egp_onnx.graph.ops import LAYER_KINDS, LayerKind


@dataclass(frozen=True)
class Layer:
    """A Conv/Gemm/MatMul node whose weight initializer egp-onnx may prune."""

    name: str
    op_type: str
    weight: str  # initializer name
    out_channels: int


def layer_kind(
    op_type: str, inputs: int, *, private_weight: bool, constant_input: bool, weight_rank: int
) -> LayerKind | None:
    """The kind of a prunable linear layer, None when the node is not one.

    Args:
        op_type: the node's op.
        inputs: how many inputs it has.
        private_weight: its second input is a constant that no other node reads (pruning a shared
            weight would change its other uses).
        constant_input: its first input is a constant (the node computes a constant).
        weight_rank: the number of axes of that constant.

    """
    kind = LAYER_KINDS.get(op_type)
    if kind is None or inputs < 2 or not private_weight or constant_input or not kind.accepts(weight_rank):
        return None
    return kind


def layer_of(node: onnx.NodeProto, index: GraphIndex) -> Layer | None:
    """The Layer record for a prunable Conv/Gemm/MatMul node, else None (see :func:`layer_kind`)."""
    weight = node.input[1] if len(node.input) > 1 else ""
    init = index.initializers.get(weight)
    kind = layer_kind(
        node.op_type,
        len(node.input),
        private_weight=init is not None and index.private(weight),
        constant_input=bool(node.input) and node.input[0] in index.initializers,
        weight_rank=len(init.dims) if init is not None else 0,
    )
    if kind is None or init is None:
        return None
    out_channels = init.dims[kind.out_axis(attrs(node))]
    return Layer(node.name, node.op_type, weight, int(out_channels))


@dataclass(frozen=True)
class LinearLayer:
    """Geometry of one Conv/Gemm/MatMul with an initializer weight, as the solver needs it."""

    name: str
    op_type: str
    weight: str
    bias: str | None
    input: str
    output: str
    position: int  # the node index at which the layer is refit (its residual Add's, if any)
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    # Residual-aware target: the Add output, the current model's other operand, and the
    # per-channel affine map (scale, shift) from the layer's output to the Add's operand.
    residual: str | None = None
    shortcut: str | None = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None

    @property
    def kind(self) -> LayerKind:
        """The layer's op kind (graph/ops.py)."""
        return LAYER_KINDS[self.op_type]


def linear_layers(model: onnx.ModelProto) -> tuple[list[LinearLayer], dict[str, tuple[str, str]]]:
    """The layers reconstruction can refit, in refit order, and why the others are left.

    Returns:
        The layers, and per skipped layer name its weight initializer and why it cannot be refit.

    """
    index = GraphIndex(model.graph)
    positions = {id(node): i for i, node in enumerate(model.graph.node)}
    layers: list[LinearLayer] = []
    skipped: dict[str, tuple[str, str]] = {}
    for position, node in enumerate(model.graph.node):
        layer = layer_of(node, index)
        if layer is None:
            continue
        found = _refit_geometry(node, layer, index)
        if isinstance(found, str):
            skipped[node.name or node.output[0]] = (layer.weight, found)
            continue
        axis_from_end = LAYER_KINDS[node.op_type].channel_axis_from_end
        residual = residual_of(node.output[0], index, positions, layer.out_channels, axis_from_end)
        layers.append(
            LinearLayer(
                name=node.name or node.output[0],
                op_type=node.op_type,
                weight=layer.weight,
                input=node.input[0],
                output=node.output[0],
                position=residual[4] if residual else position,
                residual=residual[0] if residual else None,
                shortcut=residual[1] if residual else None,
                scale=residual[2] if residual else None,
                shift=residual[3] if residual else None,
                **found,
            )
        )
    layers.sort(key=lambda layer: layer.position)
    return layers, skipped


def _refit_geometry(node: onnx.NodeProto, layer: Layer, index: GraphIndex) -> dict[str, Any] | str:
    """The LinearLayer fields of a layer refit can take (its bias included), else why not."""
    init = index.initializers
    # shape and type from the initializer's fields: the weights themselves are not read
    shape = tuple(init[layer.weight].dims)
    dtype = helper.tensor_dtype_to_np_dtype(init[layer.weight].data_type)
    if dtype != np.float32 and dtype != np.float64:
        return f"{dtype} weights"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and bias not in init:
        return "its bias is computed, not an initializer"
    if bias is not None and not index.private(bias):
        return "its bias is shared with another node"
    kind, node_attrs = LAYER_KINDS[node.op_type], attrs(node)
    fields = kind.geometry(node_attrs, shape)
    if isinstance(fields, str):
        return fields
    if bias is not None and not kind.keeps_bias(node_attrs, tuple(init[bias].dims)):
        bias = None
    return {**fields, "bias": bias}


def _is_residual_add(node: onnx.NodeProto) -> bool:
    return node.op_type in ("Add", "Sum") and len(node.input) == 2


def channel_concat(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """True for a Concat along the channel axis (1, or -rank + 1)."""
    if node.op_type != "Concat":
        return False
    axis = attr(node, "axis", 0)
    rank = len(index.shapes.get(node.output[0], [])) or None
    return axis == 1 or (rank is not None and axis + rank == 1)


def trace(tensor: str, index: GraphIndex) -> Layer | onnx.NodeProto | None:
    """Walk back from ``tensor`` through affine ops to the layer (or channel Concat) behind it."""
    while True:
        node = index.producer.get(tensor)
        if node is None:
            return None
        layer = layer_of(node, index)
        if layer is not None:
            return layer
        if channel_concat(node, index):
            return node
        if node.op_type in affine.AFFINE_UNARY or (node.op_type == "Sum" and len(node.input) == 1):
            tensor = node.input[0]
            continue
        if node.op_type in affine.AFFINE_BINARY + ("Sum",) and len(node.input) == 2:
            a, b = node.input
            a_const, b_const = index.is_constant(a), index.is_constant(b)
            if a_const != b_const and node.op_type != "Sum":
                tensor = b if a_const else a
                continue
            if _is_residual_add(node) and not a_const:
                return _residual_owner(a, b, index)
        return None


def trace_owner(tensor: str, index: GraphIndex) -> Layer | None:
    """The layer that produces ``tensor`` through affine ops and residual adds, if any."""
    found = trace(tensor, index)
    return found if isinstance(found, Layer) else None


def _residual_owner(a: str, b: str, index: GraphIndex) -> Layer | None:
    """Owner behind a residual Add: the layer on the deeper branch."""
    owners = [(index.depth(t), trace_owner(t, index)) for t in (a, b)]
    candidates = [(d, o) for d, o in owners if o is not None]
    if len(candidates) == 1:
        return candidates[0][1]
    if len(candidates) == 2 and candidates[0][0] != candidates[1][0]:
        return max(candidates, key=lambda c: c[0])[1]
    return None


def residual_of(
    tensor: str, index: GraphIndex, positions: Mapping[int, int], channels: int, axis_from_end: int
) -> tuple[str, str, np.ndarray, np.ndarray, int] | None:
    """Follow per-channel affine ops from a layer's output to a residual Add, if there is one.

    ``positions`` maps id(node) to its index in the graph. Returns (Add output, other operand,
    scale, shift, Add's node index) or None.
    """
    scale, shift = np.ones(channels), np.zeros(channels)
    values = index.initializers
    while True:
        consumers = index.consumers.get(tensor, [])
        if len(consumers) != 1:
            return None
        node = consumers[0]
        others = [i for i in node.input if i and i != tensor]
        if node.op_type == "Identity":
            tensor = node.output[0]
            continue
        if node.op_type == "BatchNormalization" and node.input[0] == tensor:
            if not all(i in values for i in node.input[1:5]):
                return None
            gamma, beta, mean, var = (
                numpy_helper.to_array(values[i]).astype(np.float64) for i in node.input[1:5]
            )
            epsilon = float(attr(node, "epsilon", 1e-5))
            scale, shift = affine.compose_batchnorm(scale, shift, gamma, beta, mean, var, epsilon)
            tensor = node.output[0]
            continue
        if node.op_type in affine.AFFINE_BINARY and len(others) == 1 and others[0] in values:
            k = affine.per_channel(numpy_helper.to_array(values[others[0]]), channels, axis_from_end)
            first = node.input[0] == tensor
            composed = None if k is None else affine.compose_binary(node.op_type, first, scale, shift, k)
            if composed is None:
                return None
            scale, shift = composed
            tensor = node.output[0]
            continue
        if _is_residual_add(node) and len(others) == 1:
            # Only the deeper operand is the residual branch; the other is its shortcut.
            if index.is_constant(others[0]) or index.depth(others[0]) >= index.depth(tensor):
                return None
            return node.output[0], others[0], scale, shift, positions[id(node)]
        return None
