"""Normal equations of one layer, streamed: G = A~^T A~, C = A~^T Y and sum Y^2 per group.

A~ is the layer's im2col rows (reconstruct/im2col.py) with a column of ones when it has a bias,
Y its target: the dense model's output of the layer, or for a layer that ends a residual branch,
(dense Add output - current shortcut - shift) / scale. Sums are float64 whatever the activations'
type; memory is O(d^2) per layer plus :data:`CHUNK_BYTES` of rows, independent of the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

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

#: Rows a conv layer's normal equations aim for, per column: positions per sample are cut to
#: reach about this many rows over the samples (more rows cost time, not accuracy, past it).
#: A few large samples (RapidOCR's det pages) give each sample more positions, not fewer rows:
#: the rows are streamed in CHUNK_BYTES, so only time grows with them.
ROWS_PER_COLUMN = 64
#: Rows per column a layer needs to be refit at all: with fewer, its (lightly) ridge-regularised
#: least squares fits the sampled rows' noise, and the refit can leave the layer worse on other
#: inputs than its pruned weights (RapidOCR's det: squeeze-excitation layers of 6 rows, one per
#: page, for 97 columns).
MIN_ROWS_PER_COLUMN = 4
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

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (sent from a cluster worker) with the Gram matrices' upper triangles only.

        G is symmetric to the bit in practice (``a.T @ a`` is BLAS's symmetric product, and the
        bias column is added to both sides); only when it is are half of its bytes left out.
        """
        assert not self._pending  # finished: nothing left to add
        state = dict(self.__dict__)
        if np.array_equal(self.gram, self.gram.transpose(0, 2, 1)):
            upper = np.triu_indices(self.gram.shape[1])
            state["gram"] = (self.gram.shape, self.gram[:, upper[0], upper[1]])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["gram"], tuple):  # an upper triangle: mirrored back, the same bits
            shape, values = state["gram"]
            gram = np.empty(shape)
            upper = np.triu_indices(shape[1])
            gram[:, upper[0], upper[1]] = values
            gram[:, upper[1], upper[0]] = values
            state["gram"] = gram
        self.__dict__.update(state)

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


@dataclass(frozen=True)
class PartRows:
    """What a part's kept batches give a layer's normal equations, before any row is drawn.

    ``areas``: a conv layer's samples per output area; ``rows``: a dense layer's rows. Its size
    does not grow with the part's samples.
    """

    samples: int
    areas: dict[int, int]
    rows: int


@dataclass(frozen=True)
class RowPlan:
    """How every part draws its rows: positions per sample by output area, and the rows in all."""

    takes: dict[int, int]
    total: int


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
    arithmetic on them. The batches' parts (see Activations) are summed one by one, in order,
    and their sums added: a cluster adds the same partial sums (reconstruct/parts.py).
    """
    parts = layer_batches(layer, now, then, later)
    plan = plan_rows(layer, width, [part_rows(layer, kept) for kept in parts])
    if not enough_rows(plan.total, width):
        return short_equations(plan.total)
    return merge_equations(layer, [part_equations(layer, kept, plan.takes, rng) for kept in parts])


def part_rows(layer: LinearLayer, kept: Sequence[tuple[np.ndarray, ...]]) -> PartRows:
    """The samples, output areas and rows of one part's kept batches (input, [shortcut,] target)."""
    areas: dict[int, int] = {}
    rows = 0
    for *_, target in kept:
        if layer.kind.spatial:
            area = target.shape[2] * target.shape[3]
            areas[area] = areas.get(area, 0) + len(target)
        else:
            rows += target.size // target.shape[-1]
    return PartRows(sum(len(target) for *_, target in kept), areas, rows)


def plan_rows(layer: LinearLayer, width: int, parts: Sequence[PartRows]) -> RowPlan:
    """Positions per sample for every part at once: about ROWS_PER_COLUMN rows per column in all."""
    samples = sum(part.samples for part in parts)
    take = max(1, -(-ROWS_PER_COLUMN * width // max(samples, 1)))
    if not layer.kind.spatial:
        return RowPlan({}, sum(part.rows for part in parts))
    # Samples of several sizes (a model with symbolic H/W): positions in proportion to each area.
    areas = [(count, area) for part in parts for area, count in part.areas.items()]
    takes = positions_per_sample(areas, take)
    return RowPlan(takes, sum(count * takes[area] for count, area in areas))


def enough_rows(rows: int, width: int) -> bool:
    """Whether ``rows`` rows are enough to refit a layer of ``width`` columns (MIN_ROWS_PER_COLUMN)."""
    return rows >= MIN_ROWS_PER_COLUMN * width


def draws(part: PartRows, takes: dict[int, int]) -> int:
    """Numbers a part's positions take from the generator (rng.random, one 64-bit draw each)."""
    return sum(count * area for area, count in part.areas.items() if takes[area] < area)


def short_equations(rows: int) -> NormalEquations:
    """Too few rows to refit: an empty system with the count, for the record."""
    short = NormalEquations(1, 0, 0, bias=False)
    short.rows = rows
    return short


def sum_blocks(parts: int, count: int) -> list[tuple[int, int]]:
    """``count`` blocks of consecutive parts (ranges), each a node of :func:`tree_sum`'s tree.

    A block's sum is the same wherever it is taken (a worker sums its own block of parts), so
    the total is the same bits whatever the number of blocks. The largest block is halved first:
    blocks differ in size by at most a factor of two.
    """
    blocks = [(0, parts)]
    while len(blocks) < min(count, parts):
        i = max(range(len(blocks)), key=lambda b: blocks[b][1] - blocks[b][0])  # the first largest
        lo, hi = blocks[i]
        blocks[i : i + 1] = [(lo, (lo + hi) // 2), ((lo + hi) // 2, hi)]
    return blocks


def tree_sum(lo: int, hi: int, known: dict[tuple[int, int], NormalEquations]) -> NormalEquations:
    """The sums of parts ``lo`` to ``hi``: halves first, each half's sums taken alike, then added.

    ``known``: sums already taken, by range (each part's alone, or a block's). The left half's
    arrays are the result's. A fixed tree, not the parts in a row, so that a block of parts
    (:func:`sum_blocks`) is summed where its parts are and only the blocks' sums move.
    """
    found = known.get((lo, hi))
    if found is not None:
        return found
    mid = (lo + hi) // 2
    normal, other = tree_sum(lo, mid, known), tree_sum(mid, hi, known)
    # sums that overflowed stay Inf or NaN without a warning, as in NormalEquations.finish: the
    # refit sees they are not finite (in this process and on a worker alike)
    with np.errstate(over="ignore", invalid="ignore"):
        normal.gram += other.gram
        normal.cross += other.cross
        normal.target_sq += other.target_sq
    normal.rows += other.rows
    return normal


def merge_equations(layer: LinearLayer, parts: Sequence[NormalEquations]) -> NormalEquations:
    """Every part's sums added (:func:`tree_sum`), in solver order."""
    return in_solver_order(layer, tree_sum(0, len(parts), {(p, p + 1): sums for p, sums in enumerate(parts)}))


def in_solver_order(layer: LinearLayer, normal: NormalEquations) -> NormalEquations:
    """All the parts' sums of ``layer`` with its weight columns in solver order."""
    if layer.kind.spatial:
        normal.reorder(patch_order(layer, normal.gram.shape[1] - int(normal.bias)))
    return normal


def layer_batches(
    layer: LinearLayer, now: Activations, then: Activations, later: Sequence[LinearLayer]
) -> list[list[tuple[np.ndarray, ...]]]:
    """Per part, per batch both models still keep: the current input [and shortcut], and the dense target."""
    inputs = [layer.input] + ([layer.shortcut] if layer.shortcut else [])
    requests = [
        partial(now.get, inputs, {t for other in later for t in (other.input, other.shortcut) if t}),
        partial(then.get, *dense_request(layer, later)),
    ]
    # The two models' segments run at once: a segment's small nodes keep two cores busier as two
    # one-thread sessions than as one two-thread session.
    current, (dense,) = map_parts(lambda request: request(), requests)
    ours, theirs = _by_part(now.part_of, list(zip(*current, strict=True))), _by_part(then.part_of, dense)
    return [[(*o, t) for o, t in zip(a, b, strict=False)] for a, b in zip(ours, theirs, strict=True)]


def dense_request(layer: LinearLayer, later: Sequence[LinearLayer]) -> tuple[list[str], set[str]]:
    """What a layer asks of the dense model's activations: its target, and the later layers' (kept).

    The dense model's tensors do not depend on any refit: a cluster worker computes the next
    layer's ahead, with this same request, while the client solves the current one.
    """
    return [layer.residual or layer.output], {other.residual or other.output for other in later}


def _by_part(part_of: Sequence[int], batches: Sequence[object]) -> list[list[Any]]:
    """Kept batches grouped by the part they belong to (every part keeps at least one)."""
    grouped: list[list[Any]] = []
    for p, batch in zip(part_of, batches, strict=True):
        if p == len(grouped):
            grouped.append([])
        grouped[-1].append(batch)
    return grouped


def part_equations(
    layer: LinearLayer, kept: list[tuple[np.ndarray, ...]], takes: dict[int, int], rng: np.random.Generator
) -> NormalEquations:
    """The sums of one part's kept batches' rows, gathered a group of batches at a time.

    ``takes``: a conv layer's positions per sample, by output area (:func:`plan_rows`).
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
            items.extend((batches, piece) for piece in _pieces(layer, batches[0][0], where))
        for first in range(0, len(items), PARTS):
            for rows, y in map_parts(partial(_group_rows, layer), items[first : first + PARTS]):
                if normal is None:
                    normal = NormalEquations(rows.shape[0], rows.shape[2], y.shape[1], layer.bias is not None)
                normal.add(rows, y)
    assert normal is not None  # every part keeps a batch
    normal.finish()
    return normal


def _pieces(layer: LinearLayer, x: np.ndarray, where: Positions | None) -> list[Positions | None]:
    """A group's positions in consecutive slices of at most CHUNK_BYTES of im2col rows each.

    A few large samples take many positions each (ROWS_PER_COLUMN): their rows are gathered a
    slice at a time, so a group's rows never hold more than PARTS chunks at once.
    """
    if where is None:
        return [None]
    row_bytes = int(np.prod(layer.kernel)) * x.shape[1] * x.itemsize
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    b_idx, oh, ow = where
    return [
        (b_idx[i : i + step], oh[i : i + step], ow[i : i + step]) for i in range(0, max(b_idx.size, 1), step)
    ]


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
