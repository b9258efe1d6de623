"""Linear-algebra of layer merges (pure numpy), as in shared/EGP.md section 5.

Convolutions follow ONNX: weights (out, in, *kernel), cross-correlation, ``pads`` as
[begin_1, ..., begin_d, end_1, ..., end_d]. Dense layers are written ``y = x @ m + c`` with
``m`` of shape (in, out).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ConvGeometry:
    """Stride and padding of a convolution with dilation 1 and one group."""

    strides: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end...

    @property
    def rank(self) -> int:
        """Number of spatial axes."""
        return len(self.strides)

    @property
    def padded(self) -> bool:
        """True when the convolution pads its input."""
        return any(self.pads)


@dataclass(frozen=True)
class ConvMerge:
    """A convolution equivalent to B after A, and whether it is exact at the borders too."""

    weight: np.ndarray
    bias: np.ndarray
    geometry: ConvGeometry
    exact: bool


def compose_conv(
    w_a: np.ndarray,
    b_a: np.ndarray,
    geo_a: ConvGeometry,
    w_b: np.ndarray,
    b_b: np.ndarray,
    geo_b: ConvGeometry,
) -> ConvMerge:
    """Merge Conv A then Conv B (no non-linearity between) into one Conv.

    The kernel is K[o, i](t) = sum_m sum_{u + s_A v = t} W_B[o, m](v) W_A[m, i](u), of size
    k_A + s_A (k_B - 1), stride s_A s_B and pads p_A + s_A p_B. The merge is exact everywhere
    when B does not pad, or when A is a 1x1, stride-1, unpadded layer without bias (A maps
    B's zero padding to zero); otherwise it differs on a border ring and must be measured.
    """
    k_a = w_a.shape[2:]
    k_b = w_b.shape[2:]
    s_a = geo_a.strides
    size = tuple(ka + sa * (kb - 1) for ka, sa, kb in zip(k_a, s_a, k_b, strict=True))
    dtype = np.result_type(w_a, w_b)
    kernel = np.zeros((w_b.shape[0], w_a.shape[1], *size), dtype=np.float64)
    wa = w_a.astype(np.float64)
    wb = w_b.astype(np.float64)
    for v in itertools.product(*(range(k) for k in k_b)):
        index: tuple[Any, ...] = (slice(None), slice(None), *v)
        tap = np.tensordot(wb[index], wa, axes=([1], [0]))  # om,mi...->oi... through BLAS
        window = tuple(slice(vi * si, vi * si + ka) for vi, si, ka in zip(v, s_a, k_a, strict=True))
        kernel[(slice(None), slice(None), *window)] += tap
    bias = b_b.astype(np.float64) + w_b.astype(np.float64).sum(axis=tuple(range(2, w_b.ndim))) @ b_a
    d = geo_a.rank
    pads = tuple(geo_a.pads[j] + s_a[j % d] * geo_b.pads[j] for j in range(2 * d))
    strides = tuple(sa * sb for sa, sb in zip(s_a, geo_b.strides, strict=True))
    pointwise_a = all(k == 1 for k in k_a) and all(s == 1 for s in s_a) and not geo_a.padded
    exact = not geo_b.padded or (pointwise_a and not np.any(b_a))
    return ConvMerge(kernel.astype(dtype), bias.astype(dtype), ConvGeometry(strides, pads), exact)


def compose_dense(
    m_a: np.ndarray, c_a: np.ndarray, m_b: np.ndarray, c_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Merge y = (x m_a + c_a) m_b + c_b into x m + c. Exact."""
    m = m_a.astype(np.float64) @ m_b.astype(np.float64)
    c = c_a.astype(np.float64) @ m_b.astype(np.float64) + c_b.astype(np.float64)
    dtype = np.result_type(m_a, m_b)
    return m.astype(dtype), c.astype(dtype)


def fold_batchnorm(
    weight: np.ndarray,
    bias: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float,
    out_axis: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of a layer followed by BatchNormalization (inference form)."""
    factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    shape = [1] * weight.ndim
    shape[out_axis] = -1
    new_w = weight.astype(np.float64) * factor.reshape(shape)
    new_b = (bias.astype(np.float64) - mean) * factor + shift
    return new_w.astype(weight.dtype), new_b.astype(weight.dtype)


def add_identity(weight: np.ndarray, projection: np.ndarray | None = None) -> np.ndarray | None:
    """Fold a residual shortcut into a centred kernel: K[:, :, centre] += I (or += P).

    Returns None when the kernel has an even size (no centre tap).
    """
    if any(k % 2 == 0 for k in weight.shape[2:]):
        return None
    centre = tuple(k // 2 for k in weight.shape[2:])
    result = weight.copy()
    index = (slice(None), slice(None), *centre)
    if projection is None:
        result[index] += np.eye(weight.shape[0], weight.shape[1], dtype=weight.dtype)
    else:
        result[index] += projection.reshape(projection.shape[0], projection.shape[1])
    return result
