"""Read-only views of graph-surgeon nodes: layers, constants, per-channel element-wise ops."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from egp_onnx.graph import affine
from egp_onnx.graph.layers import layer_kind
from egp_onnx.graph.ops import LAYER_KINDS
from egp_onnx.surgery import algebra as kernels


def const(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of a constant tensor, None for a variable."""
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def batchnorm_params(node: gs.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float] | None:
    """(scale, shift, mean, var, epsilon) of an inference-mode BatchNormalization with constant parameters."""
    if node.op != "BatchNormalization" or len(node.outputs) != 1 or node.attrs.get("training_mode", 0):
        return None
    params = [const(t) for t in node.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return None
    scale, shift, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
    return scale, shift, mean, var, float(node.attrs.get("epsilon", 1e-5))


def single_consumer(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The only node reading ``tensor``, None if several do or it is a graph output."""
    if tensor in graph.outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def feeds_only(tensor: gs.Tensor, node: gs.Node, graph: gs.Graph) -> bool:
    """True when ``node`` is the only reader of ``tensor`` and it is not a graph output."""
    return bool(single_consumer(tensor, graph) is node)


class LayerView:
    """A Conv/Gemm/MatMul node with a private constant weight, in a normalised view."""

    def __init__(self, node: gs.Node) -> None:
        self.node = node
        self.weight = np.asarray(node.inputs[1].values)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        self.has_bias = bias is not None and isinstance(bias, gs.Constant)

    @property
    def conv(self) -> bool:
        """True for a Conv, False for Gemm/MatMul."""
        return self.node.op == "Conv"

    @property
    def float_exact(self) -> bool:
        """True when rewriting the weights in float64 and casting back loses nothing that matters.

        float16 (and narrower) weights would be rounded differently from the original model's own
        arithmetic: algebraic rewrites are skipped for them, statistics-based ones are not.
        """
        return self.weight.dtype in (np.float32, np.float64)

    @property
    def out_axis(self) -> int:
        """Axis of the weight that indexes output channels."""
        return LAYER_KINDS[self.node.op].out_axis(self.node.attrs)

    @property
    def out_channels(self) -> int:
        """Number of output channels."""
        return int(self.weight.shape[self.out_axis])

    def bias(self) -> np.ndarray:
        """The bias as a (C,) vector, zeros when the layer has none."""
        if self.has_bias:
            return np.asarray(self.node.inputs[2].values).reshape(-1).astype(self.weight.dtype)
        return np.zeros(self.out_channels, dtype=self.weight.dtype)

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """(m, c) with y = x @ m + c."""
        m = self.weight.T if self.out_axis == 0 else self.weight
        return m, self.bias()

    def geometry(self) -> kernels.ConvGeometry | None:
        """Stride and pads of a Conv (None for Gemm/MatMul).

        Only convolutions that the kernel algebra takes have a view (see :func:`layer_view`).
        """
        if not self.conv:
            return None
        attrs = self.node.attrs
        rank = self.weight.ndim - 2
        strides = tuple(int(s) for s in attrs.get("strides", [1] * rank))
        pads = tuple(int(p) for p in attrs.get("pads", [0] * 2 * rank))
        return kernels.ConvGeometry(strides, pads)


def layer_view(node: gs.Node, graph: gs.Graph) -> LayerView | None:
    """The layer view of ``node`` when egp-onnx may rewrite its weights.

    The node must be a layer (graph/layers.py's ``layer_kind``, the recogniser the pruning and
    refit use), its kind must allow the rewrite (``rewritable``) and its bias must be a constant
    the algebra can take: private to a Conv, of at most one axis for a Gemm.
    """
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    kind = layer_kind(
        node.op,
        len(node.inputs),
        private_weight=isinstance(weight, gs.Constant) and len(weight.outputs) == 1,
        constant_input=bool(node.inputs) and isinstance(node.inputs[0], gs.Constant),
        weight_rank=len(weight.shape) if isinstance(weight, gs.Constant) else 0,
    )
    if kind is None or weight is None or not kind.rewritable(node.attrs, len(weight.shape)):
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if node.op == "Gemm":
        value = const(bias) if bias is not None else np.zeros(1)
        if value is None or value.ndim > 1:
            return None
    if node.op == "Conv" and bias is not None and (const(bias) is None or len(bias.outputs) != 1):
        return None
    return LayerView(node)


def through_elementwise(node: gs.Node, tensor: gs.Tensor, value: np.ndarray, rank: int) -> np.ndarray | None:
    """Per-channel constant ``value`` after ``node``, or None if ``node`` is not per-channel."""
    if node.op in ("Identity",) or (node.op == "Dropout" and len(node.outputs) == 1):
        return value
    if node.op == "Relu":
        return np.maximum(value, 0.0)
    if node.op == "LeakyRelu":
        return np.where(value > 0, value, value * float(node.attrs.get("alpha", 0.01)))
    if node.op == "Clip" and node.inputs[0] is tensor:
        bounds = clip_bounds(node)
        return None if bounds is None else np.clip(value, *bounds)
    if node.op == "BatchNormalization" and node.inputs[0] is tensor:
        params = batchnorm_params(node)
        return None if params is None else affine.batchnorm(value, *params)
    if node.op in affine.AFFINE_BINARY and len(node.inputs) == 2:
        first = node.inputs[0] is tensor
        operand = const(node.inputs[1] if first else node.inputs[0])
        channel = per_channel(operand, value.size, rank) if operand is not None else None
        if channel is None:
            return None
        return affine.apply_binary(node.op, first, value, channel)
    return None


def clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(min, max) of a Clip (attributes before opset 11, inputs after), None when not constant."""
    low, high = float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    for i in (1, 2):
        if len(node.inputs) > i and node.inputs[i].name:
            value = const(node.inputs[i])
            if value is None or value.size != 1:
                return None
            if i == 1:
                low = float(value.reshape(-1)[0])
            else:
                high = float(value.reshape(-1)[0])
    return low, high


def per_channel(operand: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``operand`` as a (C,) vector if it broadcasts along the channel axis only (1; rank <= 2: the last)."""
    return affine.per_channel(operand, channels, rank - 1 if rank > 2 else 1, rank)
