"""im2col, pure numpy: a layer's input as the rows of its normal equations.

A conv layer's rows are the input patches at a seeded sample of its output positions, gathered
channel-last and mapped to the solver's (channel, k_h, k_w) column order by :func:`patch_order`;
a Gemm/MatMul layer's rows are its input with the leading axes flattened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from egp_onnx.graph.layers import LinearLayer

#: Sampled output positions of a conv layer: (sample, row, column) index arrays.
Positions = tuple[np.ndarray, np.ndarray, np.ndarray]


def positions(shape: tuple[int, ...], rng: np.random.Generator, take: int) -> Positions:
    """``take`` seeded output positions per sample of a conv output of ``shape`` (all if fewer)."""
    batch, _, out_h, out_w = shape
    per_sample = out_h * out_w
    take = min(per_sample, take)
    if take == per_sample:
        flat = np.arange(batch * per_sample)
    else:
        picks = rng.random((batch, per_sample)).argsort(axis=1)[:, :take]
        flat = (picks + np.arange(batch)[:, None] * per_sample).ravel()
    b_idx, rest = np.divmod(flat, per_sample)
    oh, ow = np.divmod(rest, out_w)
    return b_idx, oh, ow


def positions_per_sample(areas: Sequence[tuple[int, int]], take: int) -> dict[int, int]:
    """Output positions to sample per sample of each output area, ``take`` on average.

    ``areas`` holds (samples, output positions per sample) of each batch. A sample's share is in
    proportion to its area, so the sampled rows estimate the error over every output position of
    every sample, as the model makes it: a large image weighs more than a small one. Samples of
    one area all get ``take`` (or all their positions, if fewer).
    """
    samples = sum(count for count, _ in areas)
    total = sum(count * area for count, area in areas)
    return {area: min(area, max(1, (take * area * samples + total // 2) // total)) for _, area in areas}


def conv_rows(x: np.ndarray, layer: LinearLayer, where: Positions) -> np.ndarray:
    """im2col rows of a conv input at the output positions ``where``.

    Returns:
        rows (groups, R, k_h * k_w * C_in/groups), each row's columns in (k_h, k_w, channel)
        order: the input is padded into channel-last layout once, so each patch is gathered as
        k_h * k_w contiguous runs of channels. :func:`patch_order` maps them to solver order.

    """
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    top, left, bottom, right = layer.pads
    batch, channels, height, width = x.shape
    padded = np.zeros((batch, height + top + bottom, width + left + right, channels), dtype=x.dtype)
    padded[:, top : top + height, left : left + width] = x.transpose(0, 2, 3, 1)
    b_idx, oh, ow = where
    # Every output position's patch as a strided view (no copy), then one gather of whole patches,
    # which costs less than indexing each (row, column) of each patch.
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(padded, span, axis=(1, 2))[:, ::sh, ::sw, :, ::dh, ::dw]
    patches = windows.transpose(0, 1, 2, 4, 5, 3)[b_idx, oh, ow]  # (R, kh, kw, C)
    groups, count = layer.groups, len(b_idx)
    if groups == 1:
        return patches.reshape(1, count, -1)
    per = channels // groups
    return patches.reshape(count, kh * kw, groups, per).transpose(2, 0, 1, 3).reshape(groups, count, -1)


def patch_order(layer: LinearLayer, columns: int) -> np.ndarray:
    """For each solver column (channel, k_h, k_w), its index among :func:`conv_rows`' ``columns``."""
    kh, kw = layer.kernel
    per_group = columns // (kh * kw)
    channel, i, j = np.meshgrid(np.arange(per_group), np.arange(kh), np.arange(kw), indexing="ij")
    return ((i * kw + j) * per_group + channel).ravel()


def dense_rows(x: np.ndarray) -> np.ndarray:
    """Rows of a Gemm/MatMul input (leading axes flattened)."""
    return x.reshape(1, -1, x.shape[-1])


def groups_of(batches: Sequence[tuple[np.ndarray, ...]], limit: int) -> list[list[int]]:
    """Indices of consecutive batches of the same shapes, about ``limit`` bytes of input a group."""
    groups: list[list[int]] = []
    size, shapes = 0, None
    for i, batch in enumerate(batches):
        these = [a.shape[1:] for a in batch]
        if groups and these == shapes and size + batch[0].nbytes <= limit:
            groups[-1].append(i)
            size += batch[0].nbytes
        else:
            groups.append([i])
            size = batch[0].nbytes
        shapes = these
    return groups


def rows_of(tensor: np.ndarray, where: Positions | None) -> np.ndarray:
    """A layer-output-shaped tensor as (rows, channels): a conv's at the sampled positions only."""
    if where is None:
        return tensor.reshape(-1, tensor.shape[-1])
    b_idx, oh, ow = where
    return tensor[b_idx, :, oh, ow]
