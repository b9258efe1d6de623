"""Layer-wise reconstruction: re-solve the kept weights so each layer reproduces the dense model.

This is shared/RECONSTRUCT.md. After a pruning step, every Conv/Gemm/MatMul from the first pruned
layer on is refit in topological order by ridge least squares: its input is the activation of the
*current* model (upstream layers already refit), its target the *dense* model's output of the same
layer, and for a layer that ends a residual branch, the dense Add output minus the current
shortcut, so the branch also absorbs the shortcut's error. Pruned weights stay exactly zero.

Gram matrices are streamed into float64 sums, :data:`CHUNK_BYTES` of rows at a time (memory O(d^2)
per layer plus the chunk, independent of the number of samples). Every layer sees the first
:data:`MAX_SAMPLES` samples (rounded up to a whole batch); a conv layer about
:data:`ROWS_PER_COLUMN` rows per column of its normal equations, at most
:data:`POSITIONS_PER_SAMPLE` output positions of each sample (seeded). The activations of the
current and the dense model stay in memory from one layer to the next (egp_onnx.runtime.segments), so a
step runs each node of both models once over those samples. Per-channel affine ops between
a layer and its target (BatchNormalization, Mul/Add/Sub/Div by constants) are folded into the
target rather than into the weights: with an unregularised bias the ridge solution scales with
the target column, so this equals solving with BN folded, and the graph keeps its structure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from egp_onnx.graph.topology import GraphIndex, replace_initializers, split_weights
from egp_onnx.load.calibration import CalibrationData
from egp_onnx.prune.budget import prune_smallest
from egp_onnx.report.records import LayerFit
from egp_onnx.runtime.segments import Activations
from egp_onnx.runtime.threads import PARTS, cores, map_parts, one_blas_thread

log = logging.getLogger(__name__)

#: Output positions of one sample that enter a conv layer's normal equations at most (seeded).
POSITIONS_PER_SAMPLE = 64
#: Rows a conv layer's normal equations aim for, per column: positions per sample are cut to
#: reach about this many rows over the samples (more rows cost time, not accuracy, past it).
ROWS_PER_COLUMN = 64
#: Calibration samples a layer's normal equations see at most (the first ones, in whole batches).
MAX_SAMPLES = 1024
#: Bytes the kept activations of the current and the dense model may take together; past it the
#: last batches are dropped (see egp_onnx.runtime.segments), so memory does not grow with the model's size.
CACHE_BYTES = 512 * 2**20
#: Bytes of im2col rows a layer's normal equations collect before taking their products.
CHUNK_BYTES = 16 * 2**20
#: Bytes of layer input whose im2col rows are gathered in one call (consecutive batches joined).
GROUP_BYTES = 2 * 2**20
#: Rows a part of a chunk's products has at least (smaller chunks are not split, see map_parts).
MIN_PART_ROWS = 512
#: Layers wider than this (columns of the normal equations) are left as they are: the Gram matrix
#: alone would take WIDTH_LIMIT^2 * 8 bytes (128 MiB at 4096).
WIDTH_LIMIT = 4096
#: Ridge strength relative to the mean diagonal of the Gram matrix over the weight columns.
RIDGE = 1e-3
#: A refit layer's status when no weight is left (its bias alone was fit).
EMPTIED = "refit: bias only, no weights left"
#: Rounds of OBS selection: drop a share of the count, re-solve, repeat.
OBS_ROUNDS = 3


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


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def linear_layers(model: onnx.ModelProto) -> tuple[list[LinearLayer], dict[str, tuple[str, str]]]:
    """The layers reconstruction can refit, in refit order, and why the others are left.

    Returns:
        The layers, and per skipped layer name its weight initializer and why it cannot be refit.

    """
    index = GraphIndex(model.graph)
    init = index.initializers
    positions = {id(node): i for i, node in enumerate(model.graph.node)}
    layers: list[LinearLayer] = []
    skipped: dict[str, tuple[str, str]] = {}
    for position, node in enumerate(model.graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in init or node.input[0] in init or len(index.consumers.get(weight, [])) != 1:
            continue
        name = node.name or node.output[0]
        # shape and type from the initializer's fields: reading every weight took 0.6 s on VGG-19
        shape = tuple(init[weight].dims)
        dtype = helper.tensor_dtype_to_np_dtype(init[weight].data_type)
        if dtype != np.float32 and dtype != np.float64:
            skipped[name] = (weight, f"{dtype} weights")
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and bias not in init:
            skipped[name] = (weight, "its bias is computed, not an initializer")
            continue
        if bias is not None and len(index.consumers.get(bias, [])) != 1:
            skipped[name] = (weight, "its bias is shared with another node")
            continue
        fields: dict[str, object] = {}
        if node.op_type == "Conv":
            if len(shape) != 4 or str(_attr(node, "auto_pad", b"NOTSET")) not in ("NOTSET", "b'NOTSET'"):
                skipped[name] = (weight, "only 2-D convolutions with explicit pads are refit")
                continue
            fields = {
                "groups": int(_attr(node, "group", 1)),  # type: ignore[call-overload]
                "kernel": shape[2:],
                "strides": tuple(_attr(node, "strides", [1, 1])),  # type: ignore[arg-type]
                "pads": tuple(_attr(node, "pads", [0, 0, 0, 0])),  # type: ignore[arg-type]
                "dilations": tuple(_attr(node, "dilations", [1, 1])),  # type: ignore[arg-type]
            }
        elif node.op_type == "Gemm":
            if int(_attr(node, "transA", 0)):  # type: ignore[call-overload]
                skipped[name] = (weight, "Gemm with transA")
                continue
            fields = {
                "trans_b": bool(_attr(node, "transB", 0)),
                "alpha": float(_attr(node, "alpha", 1.0)),  # type: ignore[arg-type]
                "beta": float(_attr(node, "beta", 1.0)),  # type: ignore[arg-type]
            }
            if bias is not None and (fields["beta"] == 0 or len(init[bias].dims) != 1):
                bias = None  # a broadcast (N, M) bias or beta 0: refit the weights only
        elif len(shape) != 2:
            skipped[name] = (weight, "MatMul with a weight of rank other than 2")
            continue
        channels = shape[0] if node.op_type == "Conv" or fields.get("trans_b") else shape[1]
        axis_from_end = 3 if node.op_type == "Conv" else 1
        residual = _residual(node.output[0], index, positions, int(channels), axis_from_end)
        layers.append(
            LinearLayer(
                name=name,
                op_type=node.op_type,
                weight=weight,
                bias=bias,
                input=node.input[0],
                output=node.output[0],
                position=residual[4] if residual else position,
                residual=residual[0] if residual else None,
                shortcut=residual[1] if residual else None,
                scale=residual[2] if residual else None,
                shift=residual[3] if residual else None,
                **fields,  # type: ignore[arg-type]
            )
        )
    layers.sort(key=lambda layer: layer.position)
    return layers, skipped


def _channel_vector(value: np.ndarray, channels: int, axis_from_end: int) -> np.ndarray | None:
    """A constant operand as one value per channel, or None if it is not per-channel."""
    value = np.asarray(value, dtype=np.float64)
    if value.size == 1:
        return np.full(channels, float(value.ravel()[0]))
    if value.size == channels and value.ndim >= axis_from_end and value.shape[-axis_from_end] == channels:
        return value.reshape(channels)
    return None


def _residual(
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
            a = gamma / np.sqrt(var + float(_attr(node, "epsilon", 1e-5)))  # type: ignore[arg-type]
            scale, shift = scale * a, shift * a + beta - mean * a
            tensor = node.output[0]
            continue
        if node.op_type in ("Add", "Sub", "Mul", "Div") and len(others) == 1 and others[0] in values:
            k = _channel_vector(numpy_helper.to_array(values[others[0]]), channels, axis_from_end)
            if k is None:
                return None
            first = node.input[0] == tensor
            if node.op_type == "Add":
                shift = shift + k
            elif node.op_type == "Sub":
                scale, shift = (scale, shift - k) if first else (-scale, k - shift)
            elif node.op_type == "Mul":
                scale, shift = scale * k, shift * k
            elif first and np.all(k != 0):
                scale, shift = scale / k, shift / k
            else:
                return None
            tensor = node.output[0]
            continue
        if node.op_type in ("Add", "Sum") and len(node.input) == 2 and len(others) == 1:
            # Only the deeper operand is the residual branch; the other is its shortcut.
            if index.is_constant(others[0]) or index.depth(others[0]) >= index.depth(tensor):
                return None
            return node.output[0], others[0], scale, shift, positions[id(node)]
        return None


class _Normal:
    """Streamed normal equations of one layer, per group: G = A~^T A~, C = A~^T Y, and sum Y^2.

    Rows are collected up to :data:`CHUNK_BYTES` before their products are taken: one product of
    a few hundred rows cost more in the call than in the arithmetic, and with the other core busy
    each call waited for BLAS's second thread (a 160 x 64 Gram: 6.6 ms against 0.02 ms).
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
        """Take the products of the rows collected so far."""
        if not self._pending:
            return
        if len(self._pending) == 1:
            ((rows, target),) = self._pending
        else:
            rows = np.concatenate([r for r, _ in self._pending], axis=1)
            target = np.concatenate([t for _, t in self._pending], axis=0)
        self._pending, self._pending_bytes = [], 0
        groups, count, columns = rows.shape
        # Products in the activations' precision (float32: half the time of float64), over
        # PARTS slices of the rows at once, summed in float64 in the slices' order.
        y = target.astype(rows.dtype).reshape(count, groups, -1).transpose(1, 0, 2)
        parts = PARTS if count >= PARTS * MIN_PART_ROWS else 1
        bounds = np.linspace(0, count, parts + 1).astype(int)
        slices = [(rows[:, a:b], y[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        for gram, cross in map_parts(_products, slices):
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


def _products(part: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A^T A and A^T Y of rows A (groups, R, columns) and targets Y (groups, R, outputs), per group."""
    rows, y = part
    if rows.shape[0] == 1:
        a = rows[0]
        return (a.T @ a)[None], (a.T @ y[0])[None]  # a.T @ a: numpy's symmetric rank-k product
    transposed = rows.transpose(0, 2, 1)
    return transposed @ rows, transposed @ y


#: Sampled output positions of a conv layer: (sample, row, column) index arrays.
_Positions = tuple[np.ndarray, np.ndarray, np.ndarray]


def _positions(shape: tuple[int, ...], rng: np.random.Generator, take: int) -> _Positions:
    """``take`` seeded output positions per sample of a conv output of ``shape`` (all if fewer)."""
    batch, _, out_h, out_w = shape
    positions = out_h * out_w
    take = min(positions, take)
    if take == positions:
        flat = np.arange(batch * positions)
    else:
        picks = rng.random((batch, positions)).argsort(axis=1)[:, :take]
        flat = (picks + np.arange(batch)[:, None] * positions).ravel()
    b_idx, rest = np.divmod(flat, positions)
    oh, ow = np.divmod(rest, out_w)
    return b_idx, oh, ow


def _conv_rows(x: np.ndarray, layer: LinearLayer, where: _Positions) -> np.ndarray:
    """im2col rows of a conv input at the output positions ``where``.

    Returns:
        rows (groups, R, k_h * k_w * C_in/groups), each row's columns in (k_h, k_w, channel)
        order: the input is padded into channel-last layout once, so each patch is gathered as
        k_h * k_w contiguous runs of channels. :func:`_patch_order` maps them to solver order.

    """
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    top, left, bottom, right = layer.pads
    batch, channels, height, width = x.shape
    padded = np.zeros((batch, height + top + bottom, width + left + right, channels), dtype=x.dtype)
    padded[:, top : top + height, left : left + width] = x.transpose(0, 2, 3, 1)
    b_idx, oh, ow = where
    # Every output position's patch as a strided view (no copy), then one gather of whole patches:
    # 2-3x faster than indexing each (row, column) of each patch (0.48 -> 0.23 ms for 37 positions
    # of 32 samples of 64x7x7).
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(padded, span, axis=(1, 2))[:, ::sh, ::sw, :, ::dh, ::dw]
    patches = windows.transpose(0, 1, 2, 4, 5, 3)[b_idx, oh, ow]  # (R, kh, kw, C)
    groups, count = layer.groups, len(b_idx)
    if groups == 1:
        return patches.reshape(1, count, -1)
    per = channels // groups
    return patches.reshape(count, kh * kw, groups, per).transpose(2, 0, 1, 3).reshape(groups, count, -1)


def _patch_order(layer: LinearLayer, columns: int) -> np.ndarray:
    """For each solver column (channel, k_h, k_w), its index among :func:`_conv_rows`' ``columns``."""
    kh, kw = layer.kernel
    per_group = columns // (kh * kw)
    channel, i, j = np.meshgrid(np.arange(per_group), np.arange(kh), np.arange(kw), indexing="ij")
    return ((i * kw + j) * per_group + channel).ravel()


def _dense_rows(x: np.ndarray) -> np.ndarray:
    """Rows of a Gemm/MatMul input (leading axes flattened)."""
    return x.reshape(1, -1, x.shape[-1])


def _to_columns(layer: LinearLayer, w: np.ndarray) -> np.ndarray:
    """Weights as (groups, columns, outputs per group) in the solver's layout."""
    if layer.op_type == "Conv":
        groups = layer.groups
        return w.reshape(groups, w.shape[0] // groups, -1).transpose(0, 2, 1)
    effective = w.T if layer.trans_b else w
    return effective[None] * layer.alpha


def _from_columns(layer: LinearLayer, columns: np.ndarray, like: np.ndarray) -> np.ndarray:
    if layer.op_type == "Conv":
        return columns.transpose(0, 2, 1).reshape(like.shape)
    effective = columns[0] / layer.alpha
    return effective.T if layer.trans_b else effective


def _ridge(gram: np.ndarray, bias: bool) -> float:
    weight_diag = np.diag(gram)[: gram.shape[0] - int(bias)]
    return RIDGE * float(weight_diag.mean()) if weight_diag.size else 0.0


def _solve(
    gram: np.ndarray, cross: np.ndarray, support: np.ndarray, bias: bool, inverse: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Ridge solution of every output on its own support; optionally diag of the inverses (OBS).

    Args:
        gram: (d, d) with the bias last when ``bias``.
        cross: (d, outputs).
        support: (columns, outputs) bool, the kept weights of each output.
        bias: whether the last column is the (always kept, unregularised) bias.
        inverse: also return the diagonal of each output's inverse system.

    Returns:
        The solution (d, outputs), exactly 0 off the support, and the inverses' diagonals (same
        shape) or None.

    """
    d, outputs = cross.shape
    lam = _ridge(gram, bias)
    keep = np.ones((d, outputs), dtype=bool)
    keep[: support.shape[0]] = support
    regular = np.zeros(d)
    regular[: support.shape[0]] = lam
    if keep.all() and not inverse:  # one system for every output
        return _stable_solve(gram + np.diag(regular), cross), None
    solution = np.zeros((d, outputs))
    diag = np.zeros((d, outputs)) if inverse else None
    # Each output's system is its support's rows and columns of the Gram matrix. Outputs are
    # taken in order of support size and solved in batches, each system padded to the batch's
    # largest with identity rows (which solve to 0), so the cost follows the kept weights.
    sizes = keep.sum(axis=0)
    order = np.argsort(sizes, kind="stable")
    largest = max(1, int(sizes.max()))
    chunk = max(1, int(2**23 // (largest * largest)))  # systems per batched call: at most 64 MiB
    # Padding entries index row and column d, zero in these copies, so a gather builds the systems.
    padded = np.zeros((d + 1, d + 1))
    padded[:d, :d] = gram
    padded_cross = np.zeros((d + 1, outputs))
    padded_cross[:d] = cross

    def batch(cols: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray | None]:
        """The solutions of outputs ``cols``: where they go, their values, the inverses' diagonals."""
        m = max(1, int(sizes[cols].max()))
        idx = np.argsort(~keep[:, cols].T, axis=1, kind="stable")[:, :m]  # support first, in order
        valid = np.arange(m)[None, :] < sizes[cols][:, None]
        at = np.where(valid, idx, d)
        systems = padded[at[:, :, None], at[:, None, :]]
        diagonal = np.arange(m)
        systems[:, diagonal, diagonal] += np.where(valid, regular[idx], 1.0)
        rhs = padded_cross[at, cols[:, None]][:, :, None]
        where = (idx[valid], np.broadcast_to(cols[:, None], idx.shape)[valid])
        if not inverse:
            return where, _stable_solve(systems, rhs)[:, :, 0][valid], None
        inv = np.linalg.inv(systems)
        return where, (inv @ rhs)[:, :, 0][valid], np.diagonal(inv, axis1=1, axis2=2)[valid]

    # Batches of sizes in order, each split in PARTS solved at once (the smaller systems first).
    batches = [
        part
        for start in range(0, outputs, chunk)
        for part in np.array_split(order[start : start + chunk], PARTS)
        if part.size
    ]
    for where, values, inverse_diag in map_parts(batch, batches):
        solution[where] = values
        if diag is not None and inverse_diag is not None:
            diag[where] = inverse_diag
    solution[~keep] = 0.0
    return solution, diag


def _stable_solve(systems: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """np.linalg.solve, falling back to least squares when a system is singular."""
    try:
        return np.linalg.solve(systems, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(systems) @ rhs


def _residual_error(gram: np.ndarray, cross: np.ndarray, target_sq: np.ndarray, w: np.ndarray) -> float:
    """Sum over outputs of ||A~ w - y||^2 from the normal equations."""
    quad = ((gram @ w) * w).sum(axis=0)
    return float((quad - 2 * (w * cross).sum(axis=0) + target_sq).sum())


def _obs_masks(normal: _Normal, current: np.ndarray, remove: int) -> np.ndarray:
    """Kept-weight masks after dropping ``remove`` weights by OBS saliency, in rounds.

    ``current`` is (groups, d, outputs per group) including the bias row when the layer has one.
    """
    columns = current.shape[1] - int(normal.bias)
    support = np.ascontiguousarray(current[:, :columns] != 0)
    left = remove
    for round_ in range(OBS_ROUNDS):
        if left <= 0:
            break
        share = int(np.ceil(left / (OBS_ROUNDS - round_)))
        saliency = np.full(support.shape, np.inf)
        for g in range(support.shape[0]):
            solution, inv_diag = _solve(
                normal.gram[g], normal.cross[g], support[g], normal.bias, inverse=True
            )
            assert inv_diag is not None
            w, h = solution[:columns], inv_diag[:columns]
            with np.errstate(divide="ignore", invalid="ignore"):
                saliency[g] = np.where(support[g] & (h > 0), w**2 / h, np.inf)
            saliency[g][support[g] & ~(h > 0)] = 0.0
        flat = saliency.ravel()
        kept = np.flatnonzero(np.isfinite(flat))
        share = min(share, kept.size)
        drop = kept[np.argsort(flat[kept], kind="stable")[:share]]
        support.flat[drop] = False
        left -= share
    return support


@dataclass(frozen=True)
class ReconstructionResult:
    """The refit model and a record per layer."""

    model: onnx.ModelProto
    fits: tuple[LayerFit, ...]


def reconstruct(
    dense: onnx.ModelProto,
    current: onnx.ModelProto,
    data: CalibrationData,
    batch_size: int,
    *,
    remove: Mapping[str, int],
    masked: Iterable[str],
    select: str = "magnitude",
    seed: int = 0,
    on_layer: Callable[[str], None] | None = None,
    known: Mapping[str, np.ndarray] | None = None,
) -> ReconstructionResult:
    """Prune ``remove[weight]`` weights of each named layer, then refit the layers from there on.

    Args:
        dense: the original model: the targets.
        current: the model being compressed (same graph as ``dense``, other values).
        data: calibration data to fit on.
        batch_size: samples per onnxruntime call.
        remove: per weight initializer, how many of its non-zero weights to prune now.
        masked: weight initializers whose zeros are pruned weights (they stay zero); other layers
            are refit on their full support.
        select: ``magnitude`` (smallest |w| first, before the fit) or ``obs`` (OBS saliency on the
            normal equations, in rounds).
        seed: position subsample and magnitude tie order.
        on_layer: called with each layer's name as its refit starts (progress).
        known: values of ``current``'s initializers already read (e.g. the loop's weights): they
            are used as they are instead of being read and copied again (never written).

    Returns:
        The new model (``current`` is not modified) and a record per layer from the first pruned
        one on (layers that cannot be refit say why; a count they were given is removed by
        magnitude).

    """
    layers, skipped = linear_layers(current)
    masked = set(masked)
    rng = np.random.default_rng(seed)
    first = next((i for i, layer in enumerate(layers) if remove.get(layer.weight, 0) > 0), None)
    todo = [] if first is None else layers[first:]
    changing = [n for layer in layers for n in (layer.weight, layer.bias) if n]
    ours, values = split_weights(current, always=[*changing, *(w for w, _ in skipped.values())], known=known)
    original = dict(values)  # the arrays themselves are never modified, only replaced in ``values``
    updates: dict[str, np.ndarray] = {}
    for weight_name, _ in skipped.values():
        count = int(remove.get(weight_name, 0))
        if count > 0:  # a layer the solver cannot take still loses its share, by magnitude, first
            updates[weight_name] = prune_smallest(values[weight_name], count, rng)
    values.update(updates)
    fits = [LayerFit(name, 0, 0, None, None, f"not refit: {why}") for name, (_, why) in skipped.items()]
    if todo:
        batches = _first_samples(data, batch_size)
        # The first step refits the dense model itself: its weights are read once, not twice.
        theirs, dense_values = (ours, original) if dense is current else split_weights(dense)
        # Each layer's tensors of the two models are computed at once, each on half the cores.
        threads = max(1, cores() // 2)
        now = Activations(ours, values, batches, CACHE_BYTES // 2, threads)
        then = Activations(theirs, dense_values, batches, CACHE_BYTES // 2, threads)
    # numpy's BLAS on one thread: measured on the idle machine, a step took as long as on two (MNIST
    # sample 1.77 against 1.63 s, ResNet-style net 4.9 against 5.2 s), and with the other core busy
    # 2-3x less (MNIST 2.9 against 6.0 s): a product split over two threads waits for the slower,
    # and each of the many small solves for both.
    with one_blas_thread():
        for k, layer in enumerate(todo):
            if on_layer is not None:
                on_layer(layer.name)
            weight = values[layer.weight]
            count = int(remove.get(layer.weight, 0))
            by_magnitude = select == "magnitude" or _width(layer, weight) > WIDTH_LIMIT
            if count > 0 and by_magnitude:
                weight = prune_smallest(weight, count, rng)
            fit, refit = _refit(
                layer,
                weight,
                values,
                partial(_normal_equations, layer, now=now, then=then, later=todo[k + 1 :], rng=rng),
                remove=0 if by_magnitude else count,
                full_support=layer.weight not in masked and count == 0,
            )
            if count > 0 and not by_magnitude and layer.weight not in refit:
                refit[layer.weight] = prune_smallest(weight, count, rng)  # OBS impossible: magnitude
            refit.setdefault(layer.weight, weight)
            values.update(refit)  # the next requests to ``now`` run this layer with its new weights
            updates.update(refit)
            fits.append(fit)
    return ReconstructionResult(replace_initializers(current, updates), tuple(fits))


def _first_samples(data: CalibrationData, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The batches holding the first :data:`MAX_SAMPLES` samples (whole: a model may fix its batch size)."""
    batches, seen = [], 0
    for feed, _ in data.batches(batch_size):
        if seen >= MAX_SAMPLES:
            break
        batches.append(feed)
        seen += len(next(iter(feed.values())))
    return batches


def _width(layer: LinearLayer, weight: np.ndarray) -> int:
    """Columns of the layer's normal equations (the bias included)."""
    if layer.op_type == "Conv":
        columns = int(np.prod(weight.shape[1:]))
    else:
        columns = weight.shape[1] if layer.trans_b else weight.shape[0]
    return columns + int(layer.bias is not None)


def _refit(
    layer: LinearLayer,
    weight: np.ndarray,
    values: Mapping[str, np.ndarray],
    equations: Callable[[int], _Normal],
    *,
    remove: int,
    full_support: bool,
) -> tuple[LayerFit, dict[str, np.ndarray]]:
    """Solve one layer; returns its record and the new initializer values (empty if not refit)."""
    width = _width(layer, weight)
    if width > WIDTH_LIMIT:
        return LayerFit(layer.name, 0, width, None, None, f"not refit: {width} columns > {WIDTH_LIMIT}"), {}
    normal = equations(width)
    if normal.rows < width:
        why = f"not refit: {normal.rows} rows < {width} columns"
        return LayerFit(layer.name, normal.rows, width, None, None, why), {}
    columns = width - int(layer.bias is not None)
    bias = values[layer.bias] if layer.bias else None
    state = _to_columns(layer, weight).astype(np.float64)
    if bias is not None:
        state = np.concatenate([state, _bias_row(layer, bias)], axis=1)
    if remove > 0:
        support = _obs_masks(normal, state, remove)
    elif full_support:
        support = np.ones(state[:, :columns].shape, dtype=bool)
    else:
        support = state[:, :columns] != 0
    start = state.copy()
    start[:, :columns][~support] = 0.0
    solved = np.zeros_like(state)
    before = after = 0.0
    per = state.shape[2]
    for g in range(state.shape[0]):
        solved[g], _ = _solve(normal.gram[g], normal.cross[g], support[g], normal.bias)
        # An input that was zero on every calibration row says nothing about its weight (the
        # ridge would set it to 0): keep it as it was, it still acts on inputs not seen here.
        unseen = np.diag(normal.gram[g])[:columns] == 0
        solved[g][:columns][unseen] = start[g][:columns][unseen]
        target_sq = normal.target_sq[g * per : (g + 1) * per]
        before += _residual_error(normal.gram[g], normal.cross[g], target_sq, start[g])
        after += _residual_error(normal.gram[g], normal.cross[g], target_sq, solved[g])
    dead = np.abs(layer.scale) < 1e-12 if layer.scale is not None else np.zeros(0, dtype=bool)
    if dead.any():
        # A channel whose affine map is zero has no target: it keeps its (pruned) values.
        flat = solved.transpose(0, 2, 1).reshape(-1, solved.shape[1])
        flat[dead] = start.transpose(0, 2, 1).reshape(-1, start.shape[1])[dead]
        solved = flat.reshape(state.shape[0], per, -1).transpose(0, 2, 1)
    total = float(normal.target_sq.sum()) or 1.0
    updates = {layer.weight: _from_columns(layer, solved[:, :columns], weight).astype(weight.dtype)}
    if layer.bias is not None and bias is not None:
        updates[layer.bias] = _bias_from_row(layer, solved[:, columns:], bias)
    # A layer with no weights left has only its bias to fit: its error stays about 1 (it is
    # bypassed or deleted by surgery), and the steps table leaves it out of "worst layer error".
    status = "refit" if support.any() else EMPTIED
    fit = LayerFit(layer.name, normal.rows, width, before / total, after / total, status)
    return fit, updates


def _bias_row(layer: LinearLayer, bias: np.ndarray) -> np.ndarray:
    """The bias as the solver's last row: (groups, 1, outputs per group)."""
    effective = bias.astype(np.float64) * (layer.beta if layer.op_type == "Gemm" else 1.0)
    groups = layer.groups if layer.op_type == "Conv" else 1
    return effective.reshape(groups, 1, -1)


def _bias_from_row(layer: LinearLayer, row: np.ndarray, like: np.ndarray) -> np.ndarray:
    effective = row.reshape(-1) / (layer.beta if layer.op_type == "Gemm" else 1.0)
    return effective.astype(like.dtype).reshape(like.shape)


def _normal_equations(
    layer: LinearLayer,
    width: int,
    now: Activations,
    then: Activations,
    later: Sequence[LinearLayer],
    rng: np.random.Generator,
) -> _Normal:
    """The normal equations of a layer of ``width`` columns: input as now, target as in the dense model.

    A conv layer's targets (and shortcuts) are read at the sampled positions only, before any
    arithmetic on them.
    """
    inputs = [layer.input] + ([layer.shortcut] if layer.shortcut else [])
    targets = {other.residual or other.output for other in later}
    requests = [
        partial(now.get, inputs, {t for other in later for t in (other.input, other.shortcut) if t}),
        partial(then.get, [layer.residual or layer.output], targets),
    ]
    # The two models' segments run at once: a segment's small nodes keep two cores busier as two
    # one-thread sessions than as one two-thread session (digits sample: 0.07-0.09 s a model).
    current, (dense,) = map_parts(lambda request: request(), requests)
    normal: _Normal | None = None
    kept = list(zip(*current, dense, strict=False))  # the batches both still keep
    samples = sum(len(target) for *_, target in kept)
    take = min(POSITIONS_PER_SAMPLE, max(1, -(-ROWS_PER_COLUMN * width // samples)))
    conv = layer.op_type == "Conv"
    total = sum(
        len(t) * min(take, t.shape[2] * t.shape[3]) if conv else t.size // t.shape[-1] for *_, t in kept
    )
    if total < width:  # too few rows to refit: an empty system with the count, for the record
        short = _Normal(1, 0, 0, bias=False)
        short.rows = total
        return short

    def rows_of_group(
        item: tuple[list[tuple[np.ndarray, ...]], _Positions | None],
    ) -> tuple[np.ndarray, np.ndarray]:
        batches, where = item
        x, *shortcut, target = (
            np.concatenate(arrays) if len(batches) > 1 else arrays[0] for arrays in zip(*batches, strict=True)
        )
        rows = _dense_rows(x) if where is None else _conv_rows(x, layer, where)
        y = _rows_of(target, where).astype(np.float64)
        if shortcut and layer.scale is not None and layer.shift is not None:
            safe = np.where(np.abs(layer.scale) < 1e-12, 1.0, layer.scale)
            y = (y - _rows_of(shortcut[0], where) - layer.shift) / safe
        return rows, y

    # Consecutive batches are joined so that each gather is larger and numpy is called less often
    # (with the window view in _conv_rows, MNIST's refit 1.81 -> 1.67 s); PARTS groups at once.
    # A group's positions are drawn for its samples at once, in order: the generator gives the
    # same numbers as when each batch drew its own.
    groups = _groups(kept, min(GROUP_BYTES, -(-sum(batch[0].nbytes for batch in kept) // PARTS)))
    for start in range(0, len(groups), PARTS):
        items = []
        for group in groups[start : start + PARTS]:
            batches = [kept[i] for i in group]
            shape = (sum(len(batch[-1]) for batch in batches), *batches[0][-1].shape[1:])
            items.append((batches, _positions(shape, rng, take) if conv else None))
        for rows, y in map_parts(rows_of_group, items):
            if normal is None:
                normal = _Normal(rows.shape[0], rows.shape[2], y.shape[1], layer.bias is not None)
            normal.add(rows, y)
    assert normal is not None  # CalibrationData is never empty
    normal.finish()
    if conv:
        normal.reorder(_patch_order(layer, normal.gram.shape[1] - int(normal.bias)))
    return normal


def _groups(batches: Sequence[tuple[np.ndarray, ...]], limit: int) -> list[list[int]]:
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


def _rows_of(tensor: np.ndarray, where: _Positions | None) -> np.ndarray:
    """A layer-output-shaped tensor as (rows, channels): a conv's at the sampled positions only."""
    if where is None:
        return tensor.reshape(-1, tensor.shape[-1])
    b_idx, oh, ow = where
    return tensor[b_idx, :, oh, ow]
