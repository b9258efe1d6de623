"""Per-channel affine algebra, pure numpy: the one home of what an element-wise op does to channels.

A per-channel affine map is y = scale * x + shift with one (scale, shift) per channel. Identity,
an inference BatchNormalization and Add/Sub/Mul/Div by a per-channel constant keep a map affine
(Div only with the variable first and a non-zero divisor); the walkers of graph/layers.py and
surgery/view.py follow chains of them.
"""

from __future__ import annotations

import numpy as np

#: Ops that map a tensor to itself per channel, without a second operand.
AFFINE_UNARY = ("BatchNormalization", "Identity", "Dropout")
#: Element-wise ops that are per-channel affine when one operand is a per-channel constant.
AFFINE_BINARY = ("Add", "Sub", "Mul", "Div")
_NUMPY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def per_channel(
    operand: np.ndarray, channels: int, axis_from_end: int, rank: int | None = None
) -> np.ndarray | None:
    """``operand`` as a (C,) float64 vector if it broadcasts along the channel axis only, else None.

    The channel axis is ``axis_from_end`` from the end of the variable operand; a scalar is the
    same value for every channel. With ``rank`` (the variable's rank) an operand of more axes,
    which would broadcast the result to a larger shape, is not per-channel.
    """
    operand = np.asarray(operand)
    if operand.size == 1:
        return np.full(channels, float(operand.reshape(-1)[0]))
    if rank is not None and operand.ndim > rank:
        return None
    if operand.size != channels or operand.ndim < axis_from_end:
        return None
    if operand.shape[-axis_from_end] == channels:
        return operand.reshape(channels).astype(np.float64)
    return None


def apply_binary(op_type: str, value_first: bool, value: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The element-wise ``op_type`` of per-channel values and a per-channel constant ``k``."""
    a, b = (value, k) if value_first else (k, value)
    return np.asarray(_NUMPY[op_type](a, b))


def compose_binary(
    op_type: str, value_first: bool, scale: np.ndarray, shift: np.ndarray, k: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """The map (scale, shift) followed by ``op_type`` with the per-channel constant ``k``.

    Returns:
        The new (scale, shift), or None when the result is not affine (k / x, or a division by 0).

    """
    if op_type == "Add":
        return scale, shift + k
    if op_type == "Sub":
        return (scale, shift - k) if value_first else (-scale, k - shift)
    if op_type == "Mul":
        return scale * k, shift * k
    if op_type == "Div" and value_first and np.all(k != 0):
        return scale / k, shift / k
    return None


def batchnorm_factor(gamma: np.ndarray, var: np.ndarray, epsilon: float) -> np.ndarray:
    """The factor a = gamma / sqrt(var + epsilon) of BatchNormalization(x) = a * (x - mean) + beta."""
    return gamma / np.sqrt(var + epsilon)


def compose_batchnorm(
    scale: np.ndarray,
    shift: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The map (scale, shift) followed by an inference BatchNormalization.

    Returns:
        (a scale, a shift + beta - a mean), a from :func:`batchnorm_factor`.

    """
    a = batchnorm_factor(gamma, var, epsilon)
    return scale * a, shift * a + beta - mean * a


def batchnorm(
    x: np.ndarray, scale: np.ndarray, shift: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> np.ndarray:
    """BatchNormalization of per-channel values ``x`` (C,): (x - mean) / sqrt(var + eps) * scale + shift."""
    return (x - mean) / np.sqrt(var + epsilon) * scale + shift
