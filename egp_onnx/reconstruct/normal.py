"""Normal equations of one layer, streamed: G = A~^T A~, C = A~^T Y and sum Y^2 per group.

A~ is the layer's im2col rows (reconstruct/im2col.py) with a column of ones when it has a bias,
Y its target: the dense model's output of the layer, or for a layer that ends a residual branch,
(dense Add output - current shortcut - shift) / scale. Sums are float64 whatever the activations'
type; memory is O(d^2) per layer plus :data:`CHUNK_BYTES` of rows, independent of the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np

from egp_onnx.graph.layers import LinearLayer
from egp_onnx.reconstruct.im2col import (
    Positions,
    conv_rows,
    dense_rows,
    groups_of,
    patch_order,
    positions,
    positions_per_sample,
    rows_of,
)
from egp_onnx.runtime.segments import Activations
from egp_onnx.runtime.threads import PARTS, map_parts

#: Output positions of one sample that enter a conv layer's normal equations at most (seeded).
POSITIONS_PER_SAMPLE = 64
#: Rows a conv layer's normal equations aim for, per column: positions per sample are cut to
#: reach about this many rows over the samples (more rows cost time, not accuracy, past it).
ROWS_PER_COLUMN = 64
#: Bytes of im2col rows a layer's normal equations collect before taking their products.
CHUNK_BYTES = 16 * 2**20
#: Bytes of layer input whose im2col rows are gathered in one call (consecutive batches joined).
GROUP_BYTES = 2 * 2**20
#: Rows a part of a chunk's products has at least (smaller chunks are not split, see map_parts).
MIN_PART_ROWS = 512

#: One group of consecutive batches (input, [shortcut,] target each) and its sampled positions.
_Group = tuple[list[tuple[np.ndarray, ...]], Positions | None]


class NormalEquations:
    """Streamed normal equations of one layer, per group: G = A~^T A~, C = A~^T Y, and sum Y^2.

    Rows are collected up to :data:`CHUNK_BYTES` before their products are taken, so that each
    product is large enough for its arithmetic, not the call, to take the time.
    """

    def __init__(self, groups: int, columns: int, outputs: int, bias: bool) -> None:
        d = columns + int(bias)
        self.bias = bias
        self.gram = np.zeros((groups, d, d))
        self.cross = np.zeros((groups, d, outputs // groups))
        self.target_sq = np.zeros(outputs)
        self.rows = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_bytes = 0

    def add(self, rows: np.ndarray, target: np.ndarray) -> None:
        """``rows`` (groups, R, columns) of inputs, ``target`` (R, outputs) in float64."""
        self._pending.append((rows, target))
        self._pending_bytes += rows.nbytes
        self.rows += rows.shape[1]
        if self._pending_bytes >= CHUNK_BYTES:
            self.finish()

    def finish(self) -> None:
        """Take the products of the rows collected so far.

        Activations near float32's range overflow the products to Inf or NaN: no warning, the
        refit sees the equations are not finite and leaves the layer as it is.
        """
        with np.errstate(over="ignore", invalid="ignore"):
            self._finish()

    def _finish(self) -> None:
        if not self._pending:
            return
        if len(self._pending) == 1:
            ((rows, target),) = self._pending
        else:
            rows = np.concatenate([r for r, _ in self._pending], axis=1)
            target = np.concatenate([t for _, t in self._pending], axis=0)
        self._pending, self._pending_bytes = [], 0
        groups, count, columns = rows.shape
        # Products in the activations' precision (float32 is the faster), over PARTS slices of
        # the rows at once, summed in float64 in the slices' order.
        y = target.astype(rows.dtype).reshape(count, groups, -1).transpose(1, 0, 2)
        parts = PARTS if count >= PARTS * MIN_PART_ROWS else 1
        bounds = np.linspace(0, count, parts + 1).astype(int)
        slices = [(rows[:, a:b], y[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        for gram, cross in map_parts(products, slices):
            self.gram[:, :columns, :columns] += gram
            self.cross[:, :columns] += cross
        if self.bias:  # the column of ones, without forming it
            sums = rows.sum(axis=1, dtype=np.float64)
            self.gram[:, columns, :columns] += sums
            self.gram[:, :columns, columns] += sums
            self.gram[:, columns, columns] += count
            self.cross[:, columns] += target.sum(axis=0).reshape(groups, -1)
        self.target_sq += (target**2).sum(axis=0)

    def reorder(self, order: np.ndarray) -> None:
        """Put the weight columns in solver order: column k of the result is column order[k]."""
        full = np.concatenate([order, np.arange(order.size, self.gram.shape[1])])
        self.gram = self.gram[:, full][:, :, full]
        self.cross = self.cross[:, full]


def products(part: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A^T A and A^T Y of rows A (groups, R, columns) and targets Y (groups, R, outputs), per group."""
    rows, y = part
    with np.errstate(over="ignore", invalid="ignore"):  # in a worker thread: its own error state
        return _products(rows, y)


def _products(rows: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if rows.shape[0] == 1:
        a = rows[0]
        return (a.T @ a)[None], (a.T @ y[0])[None]  # a.T @ a: numpy's symmetric rank-k product
    transposed = rows.transpose(0, 2, 1)
    return transposed @ rows, transposed @ y


def normal_equations(
    layer: LinearLayer,
    width: int,
    now: Activations,
    then: Activations,
    later: Sequence[LinearLayer],
    rng: np.random.Generator,
) -> NormalEquations:
    """The normal equations of a layer of ``width`` columns: input as now, target as in the dense model.

    A conv layer's targets (and shortcuts) are read at the sampled positions only, before any
    arithmetic on them.
    """
    kept = _batches(layer, now, then, later)
    samples = sum(len(target) for *_, target in kept)
    take = min(POSITIONS_PER_SAMPLE, max(1, -(-ROWS_PER_COLUMN * width // samples)))
    spatial = layer.kind.spatial
    # Samples of several sizes (a model with symbolic H/W): positions in proportion to each area.
    areas = [(len(t), t.shape[2] * t.shape[3]) for *_, t in kept] if spatial else []
    takes = positions_per_sample(areas, take) if spatial else {}
    total = sum(
        len(t) * takes[t.shape[2] * t.shape[3]] if spatial else t.size // t.shape[-1] for *_, t in kept
    )
    if total < width:  # too few rows to refit: an empty system with the count, for the record
        short = NormalEquations(1, 0, 0, bias=False)
        short.rows = total
        return short
    normal = _accumulate(layer, kept, takes, rng)
    if spatial:
        normal.reorder(patch_order(layer, normal.gram.shape[1] - int(normal.bias)))
    return normal


def _batches(
    layer: LinearLayer, now: Activations, then: Activations, later: Sequence[LinearLayer]
) -> list[tuple[np.ndarray, ...]]:
    """Per batch both models still keep: the current input [and shortcut], and the dense target."""
    inputs = [layer.input] + ([layer.shortcut] if layer.shortcut else [])
    targets = {other.residual or other.output for other in later}
    requests = [
        partial(now.get, inputs, {t for other in later for t in (other.input, other.shortcut) if t}),
        partial(then.get, [layer.residual or layer.output], targets),
    ]
    # The two models' segments run at once: a segment's small nodes keep two cores busier as two
    # one-thread sessions than as one two-thread session.
    current, (dense,) = map_parts(lambda request: request(), requests)
    return list(zip(*current, dense, strict=False))


def _accumulate(
    layer: LinearLayer, kept: list[tuple[np.ndarray, ...]], takes: dict[int, int], rng: np.random.Generator
) -> NormalEquations:
    """The products of every kept batch's rows, gathered a group of batches at a time.

    ``takes``: a conv layer's positions per sample, by output area (:func:`positions_per_sample`).
    """
    # Consecutive batches are joined so that each gather is larger and numpy is called less often;
    # PARTS groups at once. A group's positions are drawn for its samples at once, in order: the
    # generator gives the same numbers as when each batch drew its own.
    groups = groups_of(kept, min(GROUP_BYTES, -(-sum(batch[0].nbytes for batch in kept) // PARTS)))
    normal: NormalEquations | None = None
    for start in range(0, len(groups), PARTS):
        items: list[_Group] = []
        for group in groups[start : start + PARTS]:
            batches = [kept[i] for i in group]
            shape = (sum(len(batch[-1]) for batch in batches), *batches[0][-1].shape[1:])
            where = positions(shape, rng, takes[shape[2] * shape[3]]) if layer.kind.spatial else None
            items.append((batches, where))
        for rows, y in map_parts(partial(_group_rows, layer), items):
            if normal is None:
                normal = NormalEquations(rows.shape[0], rows.shape[2], y.shape[1], layer.bias is not None)
            normal.add(rows, y)
    assert normal is not None  # CalibrationData is never empty
    normal.finish()
    return normal


def _group_rows(layer: LinearLayer, item: _Group) -> tuple[np.ndarray, np.ndarray]:
    """The rows and float64 targets of one group of batches."""
    batches, where = item
    x, *shortcut, target = (
        np.concatenate(arrays) if len(batches) > 1 else arrays[0] for arrays in zip(*batches, strict=True)
    )
    rows = dense_rows(x) if where is None else conv_rows(x, layer, where)
    y = rows_of(target, where).astype(np.float64)
    if shortcut and layer.scale is not None and layer.shift is not None:
        safe = np.where(np.abs(layer.scale) < 1e-12, 1.0, layer.scale)
        y = (y - rows_of(shortcut[0], where) - layer.shift) / safe
    return rows, y
