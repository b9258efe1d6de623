"""What egp-onnx knows of each op, in two tables keyed by op_type: activations and linear layers.

Code that would branch on an op_type asks the op's kind instead; adding an op is one class (or
one record) and one table line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from egp_onnx.graph.layers import LinearLayer


@dataclass(frozen=True)
class ActivationKind:
    """How an activation op takes part: in the budget, in surgery, in the probes."""

    kind: str  # the site's kind (relu, relu6, ...); "" = measured and reported only
    prunes: bool  # a member of the rectifier family: ON = input > 0 drives entropy and the budget
    removable: bool  # its exactly linear regions let surgery bypass it (see surgery/rewrites.py)
    probe_output: bool = False  # probed at its output (keeps Conv+Relu fused), else at its input
    from_zero: bool = False  # in the family only when its lower bound is 0 (a Clip is ReLU6)


#: Activations by op_type: ONNX ops, or decomposed forms (SiLU is x * Sigmoid(x); HardSwish also
#: x * HardSigmoid(x) and x * Clip(x + 3, 0, 6) / 6; Gelu also the Erf form; see graph/rectifiers.py).
ACTIVATIONS: dict[str, ActivationKind] = {
    "Relu": ActivationKind("relu", prunes=True, removable=True, probe_output=True),
    "Clip": ActivationKind("relu6", prunes=True, removable=True, from_zero=True),
    "LeakyRelu": ActivationKind("leaky_relu", prunes=True, removable=True),
    "PRelu": ActivationKind("prelu", prunes=True, removable=True),
    "HardSwish": ActivationKind("hardswish", prunes=True, removable=False),
    "SiLU": ActivationKind("silu", prunes=True, removable=False),
    "Gelu": ActivationKind("gelu", prunes=True, removable=False),
    "HardSigmoid": ActivationKind("", prunes=False, removable=False),
    "Elu": ActivationKind("", prunes=False, removable=False),
    "Selu": ActivationKind("", prunes=False, removable=False),
}

#: The rectifier family, by the op_type a site reports.
RECTIFIER_OPS = tuple(op for op, a in ACTIVATIONS.items() if a.prunes)
#: Activations that are measured and reported, but never drive pruning.
REPORTED_ACTIVATIONS = tuple(op for op, a in ACTIVATIONS.items() if not a.prunes)
#: Kinds whose exactly linear regions let surgery remove the activation.
REMOVABLE_KINDS = tuple(a.kind for a in ACTIVATIONS.values() if a.removable)
#: Every op counted as a non-linearity in a depth.
NONLINEAR_OPS = tuple(ACTIVATIONS)


class LayerKind(Protocol):
    """How a linear layer's weight is laid out, and what refit and surgery can do with it."""

    #: The layer's output channel axis, counted from the end, for the layers refit can take.
    channel_axis_from_end: int
    #: True when the layer slides over positions (its rows are im2col patches).
    spatial: bool

    def out_axis(self, attrs: Mapping[str, Any]) -> int:
        """Axis of the weight that indexes output channels."""

    def accepts(self, rank: int) -> bool:
        """True when a constant weight of this rank makes the node a prunable layer."""

    def geometry(self, attrs: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any] | str:
        """The LinearLayer fields refit needs, or why the layer cannot be refit."""

    def keeps_bias(self, attrs: Mapping[str, Any], bias_shape: tuple[int, ...]) -> bool:
        """True when refit solves for the bias too (False: the weights only)."""

    def rewritable(self, attrs: Mapping[str, Any], rank: int) -> bool:
        """True when surgery may rewrite the layer's weights (its attributes allow the algebra)."""

    def columns(self, layer: LinearLayer, shape: tuple[int, ...]) -> int:
        """Weight columns of the layer's normal equations (the bias not counted)."""

    def to_columns(self, layer: LinearLayer, w: np.ndarray) -> np.ndarray:
        """Weights as (groups, columns, outputs per group) in the solver's layout."""

    def from_columns(self, layer: LinearLayer, columns: np.ndarray, like: np.ndarray) -> np.ndarray:
        """The solver's (groups, columns, outputs per group) back in the weight's layout."""

    def bias_row(self, layer: LinearLayer, bias: np.ndarray) -> np.ndarray:
        """The bias as the solver's last row: (groups, 1, outputs per group)."""

    def bias_from_row(self, layer: LinearLayer, row: np.ndarray, like: np.ndarray) -> np.ndarray:
        """The solver's bias row back as the bias initializer's values."""


def _explicit_pads(attrs: Mapping[str, Any]) -> bool:
    return attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")


class _ConvKind:
    """Conv: weight (C_out, C_in / groups, k...); refit takes 2-D convolutions with explicit pads."""

    channel_axis_from_end = 3
    spatial = True

    def out_axis(self, attrs: Mapping[str, Any]) -> int:
        return 0

    def accepts(self, rank: int) -> bool:
        return True

    def geometry(self, attrs: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any] | str:
        if len(shape) != 4 or not _explicit_pads(attrs):
            return "only 2-D convolutions with explicit pads are refit"
        return {
            "groups": int(attrs.get("group", 1)),
            "kernel": shape[2:],
            "strides": tuple(attrs.get("strides", [1, 1])),
            "pads": tuple(attrs.get("pads", [0, 0, 0, 0])),
            "dilations": tuple(attrs.get("dilations", [1, 1])),
        }

    def keeps_bias(self, attrs: Mapping[str, Any], bias_shape: tuple[int, ...]) -> bool:
        return True

    def rewritable(self, attrs: Mapping[str, Any], rank: int) -> bool:
        """Surgery's kernel algebra takes ungrouped, undilated convolutions with explicit pads."""
        dilated = any(d != 1 for d in attrs.get("dilations", [1] * (rank - 2)))
        return attrs.get("group", 1) == 1 and not dilated and _explicit_pads(attrs)

    def columns(self, layer: LinearLayer, shape: tuple[int, ...]) -> int:
        return int(np.prod(shape[1:]))

    def to_columns(self, layer: LinearLayer, w: np.ndarray) -> np.ndarray:
        groups = layer.groups
        return w.reshape(groups, w.shape[0] // groups, -1).transpose(0, 2, 1)

    def from_columns(self, layer: LinearLayer, columns: np.ndarray, like: np.ndarray) -> np.ndarray:
        return columns.transpose(0, 2, 1).reshape(like.shape)

    def bias_row(self, layer: LinearLayer, bias: np.ndarray) -> np.ndarray:
        return bias.astype(np.float64).reshape(layer.groups, 1, -1)

    def bias_from_row(self, layer: LinearLayer, row: np.ndarray, like: np.ndarray) -> np.ndarray:
        return row.reshape(-1).astype(like.dtype).reshape(like.shape)


class _MatMulKind:
    """MatMul by a constant (C_in, C_out) matrix: y = x @ w, channels on the last axis."""

    channel_axis_from_end = 1
    spatial = False

    def out_axis(self, attrs: Mapping[str, Any]) -> int:
        return 1

    def accepts(self, rank: int) -> bool:
        return rank == 2  # a batched constant operand has no one output channel axis

    def geometry(self, attrs: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any] | str:
        return {}

    def keeps_bias(self, attrs: Mapping[str, Any], bias_shape: tuple[int, ...]) -> bool:
        return True

    def rewritable(self, attrs: Mapping[str, Any], rank: int) -> bool:
        return True

    def columns(self, layer: LinearLayer, shape: tuple[int, ...]) -> int:
        return shape[1] if layer.trans_b else shape[0]

    def to_columns(self, layer: LinearLayer, w: np.ndarray) -> np.ndarray:
        effective = w.T if layer.trans_b else w
        return effective[None] * layer.alpha

    def from_columns(self, layer: LinearLayer, columns: np.ndarray, like: np.ndarray) -> np.ndarray:
        effective = columns[0] / layer.alpha
        return effective.T if layer.trans_b else effective

    def bias_row(self, layer: LinearLayer, bias: np.ndarray) -> np.ndarray:
        return (bias.astype(np.float64) * layer.beta).reshape(1, 1, -1)

    def bias_from_row(self, layer: LinearLayer, row: np.ndarray, like: np.ndarray) -> np.ndarray:
        return (row.reshape(-1) / layer.beta).astype(like.dtype).reshape(like.shape)


class _GemmKind(_MatMulKind):
    """Gemm: y = alpha * x @ op(w) + beta * c, op(w) = w.T under transB."""

    def out_axis(self, attrs: Mapping[str, Any]) -> int:
        return 0 if attrs.get("transB", 0) else 1

    def accepts(self, rank: int) -> bool:
        return True

    def geometry(self, attrs: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any] | str:
        if int(attrs.get("transA", 0)):
            return "Gemm with transA"
        return {
            "trans_b": bool(attrs.get("transB", 0)),
            "alpha": float(attrs.get("alpha", 1.0)),
            "beta": float(attrs.get("beta", 1.0)),
        }

    def keeps_bias(self, attrs: Mapping[str, Any], bias_shape: tuple[int, ...]) -> bool:
        """A broadcast (N, M) bias or beta 0: refit the weights only."""
        return float(attrs.get("beta", 1.0)) != 0 and len(bias_shape) == 1

    def rewritable(self, attrs: Mapping[str, Any], rank: int) -> bool:
        """Surgery's dense algebra takes y = x @ w + c: no transA, alpha and beta 1."""
        return not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0


#: The kinds are private: the table is their interface (each class follows LayerKind's docstrings).
LAYER_KINDS: dict[str, LayerKind] = {"Conv": _ConvKind(), "Gemm": _GemmKind(), "MatMul": _MatMulKind()}
#: The linear layers egp-onnx prunes, by op_type.
LAYER_OPS = tuple(LAYER_KINDS)
