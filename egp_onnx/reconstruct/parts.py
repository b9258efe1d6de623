"""Where a refit's normal equations are summed: per part of its samples, here or on a cluster.

The refit sees the data's first :data:`MAX_SAMPLES` samples, cut into the parts of whole batches
a cluster's statistics pass uses (egp_onnx.load.parts). Each part's sums (Gram matrices, right-
hand sides, target energies) are taken alone and the parts' sums added in their order, in this
process (:class:`LocalSums`) as on a cluster (:class:`ClusterSums`), so the two give the same
bytes. A part's kept activations live where it is summed: on a cluster, on the worker the part
is pinned to, from one layer to the next; what moves per layer is the refit layer's new weights
to each part and the part's sums back, neither of which grows with the samples.

On a cluster, each worker's parts are one group, kept on it as a resident object (a Dask
actor, runtime/cluster.py) holding their activations of both models from one layer to the next:
a layer's request goes to it directly, a round trip of a few milliseconds, not a task through the
scheduler. A layer is one request when each part keeps the rows it kept for that layer in the last
step (:func:`part_rows`: how many samples of which output area): the client draws every part's
share of the seeded positions from those rows (``take`` depends on the samples of all parts, and
the generator's numbers are drawn in the parts' order) and the parts sum them at once. Otherwise,
the first step or rows that changed, the parts say what they keep and a second request sums them.

A worker that dies takes its group's activations with it: the client places the group again on
another worker, where it replays every earlier layer's request with the weights it had (the
same segments, so the same bits as the first time).
"""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx

from egp_onnx.graph.weights import split_weights
from egp_onnx.load.calibration import CalibrationData, InputSpec
from egp_onnx.load.parts import DataPart, Loader, batch_parts, part_data, plan_parts
from egp_onnx.reconstruct.normal import (
    NormalEquations,
    PartRows,
    dense_request,
    draws,
    enough_rows,
    in_solver_order,
    layer_batches,
    normal_equations,
    part_equations,
    part_rows,
    plan_rows,
    short_equations,
    sum_blocks,
    tree_sum,
)
from egp_onnx.runtime.cluster import Kept, Payload, Placed, Resident
from egp_onnx.runtime.segments import Activations
from egp_onnx.runtime.threads import cores, one_blas_thread

if TYPE_CHECKING:
    from egp_onnx.graph.layers import LinearLayer
    from egp_onnx.runtime.cluster import Cluster

log = logging.getLogger(__name__)

#: Calibration samples a layer's normal equations see at most (the first ones, in whole batches).
MAX_SAMPLES = 1024
#: Bytes the kept activations of the current and the dense model may take together; past it the
#: last batches are dropped (see egp_onnx.runtime.segments), so memory does not grow with the model's size.
#: Each part of the samples has an equal share, wherever it is computed.
CACHE_BYTES = 512 * 2**20
#: Samples a part of the refit's samples holds about (whole batches): parts, not workers, fix
#: how the sums are added, so the sums are the same whatever the number of workers.
PART_SAMPLES = 256

Weights = dict[str, np.ndarray]


def first_samples(data: CalibrationData, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The batches holding the first :data:`MAX_SAMPLES` samples (whole: a model may fix its batch size)."""
    return _within_max(data, batch_size, 0)


def _within_max(data: CalibrationData, batch_size: int, seen: int) -> list[dict[str, np.ndarray]]:
    """``data``'s batches while fewer than :data:`MAX_SAMPLES` are seen, ``seen`` before the first."""
    batches = []
    for feed, _ in data.batches(batch_size):
        if seen >= MAX_SAMPLES:
            break
        batches.append(feed)
        seen += len(next(iter(feed.values())))
    return batches


def part_size(data: CalibrationData, batch_size: int) -> int:
    """The batch size the data is cut to: the model's when it fixes one (as plan_parts cuts)."""
    fixed = data.specs[0].shape[0] if data.specs[0].shape else None
    return int(fixed or batch_size)


def activation_pair(
    ours: tuple[onnx.ModelProto, Weights],
    theirs: tuple[onnx.ModelProto, Weights],
    batches: list[dict[str, np.ndarray]],
    parts: Sequence[int] | None = None,
    threads: int | None = None,
    share: int | None = None,
) -> tuple[Activations, Activations]:
    """The kept activations of the current and the dense model (each a stubbed model and its weights).

    ``parts``: batches per part (each part gets an equal share of the budget); ``share``: on a
    cluster worker, the number of parts of the whole refit the budget is shared with (``batches``
    are some of them).
    ``threads``: onnxruntime threads of each (None: half the cores each).
    """
    # Each layer's tensors of the two models are computed at once, each on half the cores.
    threads = max(1, cores() // 2) if threads is None else threads
    count = share or (len(parts) if parts is not None else 1)
    budgets = [CACHE_BYTES // 2 // count] * (len(parts) if parts is not None else 1)
    return (
        Activations(*ours, batches, budgets, threads, parts),
        Activations(*theirs, batches, budgets, threads, parts),
    )


class PartSums(Protocol):
    """The normal equations of each layer in turn, as the refit asks for them."""

    def equations(
        self, layer: LinearLayer, width: int, later: Sequence[LinearLayer], rng: np.random.Generator
    ) -> NormalEquations:
        """The layer's equations: its input as the model is now, its target as in the dense model."""

    def update(self, new: Weights) -> None:
        """A layer's new weights: the next requests compute with them."""


class LocalSums:
    """The parts summed one after the other in this process, on one set of kept activations."""

    def __init__(
        self,
        ours: tuple[onnx.ModelProto, Weights],
        theirs: tuple[onnx.ModelProto, Weights],
        batches: list[dict[str, np.ndarray]],
        size: int,
    ) -> None:
        """``ours``' weights dict is the refit's own: its updates reach the activations directly."""
        parts = batch_parts([len(next(iter(b.values()))) for b in batches], size, PART_SAMPLES)
        self.now, self.then = activation_pair(ours, theirs, batches, parts)

    def equations(
        self, layer: LinearLayer, width: int, later: Sequence[LinearLayer], rng: np.random.Generator
    ) -> NormalEquations:
        """The parts' sums in this process (the generator draws every part's positions in turn)."""
        return normal_equations(layer, width, self.now, self.then, later, rng)

    def update(self, new: Weights) -> None:
        """Nothing to do: the activations read the refit's own weights dict."""


@dataclass(frozen=True)
class _Setup:
    """What a worker needs to open a group of parts: the step's models and the part of the data."""

    changing: tuple[str, ...]  # initializers the refit may change (stubs, as in the client)
    initial: Weights  # values changed before the first layer (unrefittable layers pruned)
    same: bool  # the dense model is the current one (the first step)
    loaders_key: str
    specs: Sequence[InputSpec]
    description: str
    batch_size: int
    parts: int  # parts the activations' budget is shared with
    threads: int  # onnxruntime threads of each model's segments (0: the cores')


@dataclass(frozen=True)
class _Draw:
    """How parts draw a layer's rows: the rows they were planned from, and each part's positions."""

    rows: list[PartRows]  # per part, what the plan assumed it keeps
    takes: dict[int, int]  # positions per sample by output area (plan_rows)
    state: dict[str, Any]  # the refit generator's state before the layer's first draw
    offsets: list[int]  # per part, the generator's draws before its own

    def of(self, parts: Sequence[int]) -> _Draw:
        """The draw of some of the parts (a group's)."""
        return _Draw([self.rows[p] for p in parts], self.takes, self.state, [self.offsets[p] for p in parts])


#: A layer's request as the groups get it: the updates sent with it, the layer, the layers after it.
Request = tuple[Weights, "LinearLayer", list["LinearLayer"]]
#: Per group, a layer's answer: each part's rows, and its parts' sums when they were drawn as planned.
Answer = tuple[list[PartRows], "NormalEquations | None"]
#: A request of the dense model's activations (normal.dense_request): the tensors, those kept.
DenseRequest = tuple[list[str], set[str]]
#: What opens a group (:meth:`_Group._open`), with its first request: the setup, the current and
#: dense models' bytes (None: the same) and the data's loaders.
Opening = tuple[_Setup, bytes, "bytes | None", Sequence[Loader]]


class _Group(Resident):
    """A group of parts on its worker: their kept activations, from one layer's request to the next.

    A group is the parts pinned to one worker: one set of kept activations, so each segment runs
    in one session over all of them (each part still keeps, and is summed, on its own). Its first
    request opens it; it lives until the client drops its handle (the refit's end).
    """

    def __init__(self, parts: Sequence[DataPart], starts: Sequence[int], first: int) -> None:
        """The group of ``parts`` (each part's first sample in ``starts``), opened by its first request.

        ``first``: the number of the group's first part: its parts are a block of
        :func:`~egp_onnx.reconstruct.normal.sum_blocks`, summed here.
        """
        self.parts, self.starts, self.first = parts, starts, first
        self.opened = False
        self.now: Activations | None = None
        self.then: Activations | None = None
        self.values: Weights = {}
        self.layer: LinearLayer | None = None
        self.kept: list[list[tuple[np.ndarray, ...]]] = []  # per part, the last layer's batches
        self.ahead: tuple[threading.Thread, DenseRequest, list[BaseException]] | None = None

    def layer_rows(
        self, replay: Sequence[Request] | None,
        request: tuple[Weights, LinearLayer, Sequence[LinearLayer], DenseRequest | None], draw: _Draw | None,
        *opening: Any,
    ) -> Answer | None:  # fmt: skip
        """Run a layer's segments: what rows each part keeps, and their sums if ``draw`` planned them.

        ``request``: (``update``, ``layer``, ``later``, ``ahead``), the same for every group.

        The activations first take ``update`` (the weights refit since the last request). The
        group's first request opens it (``opening``, an :data:`Opening`: the models and the data
        come with it, not scattered, which Dask's memory manager would keep on one worker only)
        and brings ``replay``, every earlier layer's request, run
        first with the weights each had, so that every segment is the same as the first time
        (onnxruntime fuses a segment's nodes its own way: the same tensor from another cut of the
        graph may differ in its last bits). None, as for a lost group, when a group not yet opened
        gets no ``replay`` and ``opening`` (Dask rebuilt it elsewhere unasked). ``draw``: the
        positions planned from the rows the client expects; the sums are taken only if the parts
        keep those rows.
        ``ahead``: the next layer's request of the dense model, run once this one is answered,
        while the client solves.
        """
        update, layer, later, ahead = request
        if not self.opened:
            if replay is None or not opening:
                return None
            self._open(opening)
            self.opened = True
            for earlier, done, after in replay:
                self.values.update(earlier)
                self._run(done, after)
        self.values.update(update)
        self._run(layer, later)
        rows = [part_rows(layer, part) for part in self.kept]
        answer = rows, self.sums(draw) if draw is not None and draw.rows == rows else None
        if ahead is not None:
            self._start_ahead(ahead)
        return answer

    def sums(self, draw: _Draw) -> NormalEquations | None:
        """The group's parts' sums of the last layer, added (None: not opened).

        Each part's positions are drawn its offset on; the parts' sums are added as the client's
        tree adds them (:func:`~egp_onnx.reconstruct.normal.tree_sum`): only their sum goes back.
        """
        if self.layer is None:
            return None
        sums = {}
        for i, (kept, offset) in enumerate(zip(self.kept, draw.offsets, strict=True)):
            bits = np.random.PCG64()
            bits.state = draw.state  # type: ignore[assignment]  # the state dict another PCG64 gave
            bits.advance(offset)
            with one_blas_thread():
                part = part_equations(self.layer, kept, draw.takes, np.random.Generator(bits))
            sums[self.first + i, self.first + i + 1] = part
        return tree_sum(self.first, self.first + len(self.kept), sums)

    def _run(self, layer: LinearLayer, later: Sequence[LinearLayer]) -> None:
        assert self.now is not None and self.then is not None
        self._join_ahead(dense_request(layer, later))
        with one_blas_thread():
            self.kept = layer_batches(layer, self.now, self.then, later)
        self.layer = layer

    def _start_ahead(self, request: DenseRequest) -> None:
        """The dense model's next request run on a thread of its own, its tensors kept for it.

        Asking for the same tensors with them among the kept ones runs the same segment (the
        same bits) and leaves the activations as the request itself will: it finds them there.
        """
        assert self.then is not None
        names, kept = request
        errors: list[BaseException] = []

        def run(then: Activations) -> None:
            try:
                then.get(names, {*kept, *names})
            except BaseException as exc:  # raised again by the request it was for
                errors.append(exc)

        thread = threading.Thread(target=run, args=(self.then,), name="egp-dense-ahead", daemon=True)
        thread.start()
        self.ahead = thread, request, errors

    def _join_ahead(self, request: DenseRequest) -> None:
        """Wait for the dense model's request run ahead, which must be ``request``."""
        if self.ahead is None:
            return
        thread, ahead, errors = self.ahead
        thread.join()
        self.ahead = None
        if errors:
            raise errors[0]
        if ahead != request:  # the client's plan of the layers to come and its requests disagree
            raise RuntimeError(f"refit: the dense tensors run ahead were {ahead[0]}, not {request[0]}")

    def _open(self, opening: Opening) -> None:
        """The group's activations from the step's models, its parts' batches read from the shared data."""
        setup, current, dense, loaders = opening
        parts, starts = self.parts, self.starts
        ours, values = split_weights(onnx.load_from_string(current), always=setup.changing)
        original = dict(values)
        values.update(setup.initial)
        theirs = (ours, original) if setup.same else split_weights(onnx.load_from_string(dense or b""))
        batches: list[dict[str, np.ndarray]] = []
        sizes: list[int] = []
        for part, start in zip(parts, starts, strict=True):
            data = part_data(loaders, setup.loaders_key, setup.specs, setup.description, part)
            kept = _within_max(data, setup.batch_size, start)
            batches.extend(kept)
            sizes.append(len(kept))
        threads = max(1, (setup.threads or cores()) // 2)
        pair = activation_pair((ours, values), theirs, batches, sizes, threads=threads, share=setup.parts)
        self.now, self.then = pair
        self.values = values


def _pcg(rng: np.random.Generator) -> np.random.PCG64:
    """The generator's PCG64 (default_rng's): its draws are counted and skipped, never replayed."""
    bits = rng.bit_generator
    if not isinstance(bits, np.random.PCG64):
        raise TypeError("the refit's positions on a cluster need a PCG64 generator (np.random.default_rng)")
    return bits


def _skip(rng: np.random.Generator, draws: int) -> None:
    """Advance ``rng`` by ``draws`` 64-bit draws, as ``rng.random(draws)`` would.

    PCG64.advance also drops the half of a 64-bit draw kept for the next 32-bit one (a
    permutation's draws leave one); rng.random never touches it, so it is put back.
    """
    bits = _pcg(rng)
    kept = bits.state
    bits.advance(draws)
    state = bits.state
    state["has_uint32"], state["uinteger"] = kept["has_uint32"], kept["uinteger"]
    bits.state = state


def _draw(layer: LinearLayer, width: int, rows: list[PartRows], rng: np.random.Generator) -> _Draw | None:
    """Every part's positions planned from ``rows`` (None: too few rows to refit the layer)."""
    plan = plan_rows(layer, width, rows)
    if not enough_rows(plan.total, width):
        return None
    counts = [draws(r, plan.takes) for r in rows]
    state = dict(_pcg(rng).state)
    return _Draw(rows, plan.takes, state, np.cumsum([0, *counts[:-1]]).tolist())


#: Per calibration data, the rows each layer's parts kept in the last refit (by layer name and
#: batch size): the next step's guess, so that a layer is one round trip, not two.
_LAST_ROWS: weakref.WeakKeyDictionary[CalibrationData, dict[tuple[str, int], list[PartRows]]]
_LAST_ROWS = weakref.WeakKeyDictionary()


class ClusterSums:
    """Each worker sums the parts pinned to it; the client adds the parts' sums in their order.

    Each group of parts is a :class:`_Group` kept on its worker (a resident, runtime/cluster.py):
    a request goes straight to it, not through the scheduler as a task.
    """

    def __init__(
        self,
        cluster: Cluster,
        dense: onnx.ModelProto,
        current: onnx.ModelProto,
        changing: Sequence[str],
        initial: Weights,
        data: CalibrationData,
        batch_size: int,
        asking: Collection[str],
    ) -> None:
        """``asking``: the layers that will ask for their equations (the others are not refit)."""
        self.cluster = cluster
        self.asking = asking
        parts, starts, seen = [], [], 0
        for part in plan_parts(data, batch_size, PART_SAMPLES):
            if seen >= MAX_SAMPLES:
                break
            parts.append(part)
            starts.append(seen)
            seen += part.samples
        self.parts, self.starts = parts, starts
        addresses = cluster.addresses
        # A block of consecutive parts per worker (its activations one set), summed there.
        self.blocks = sum_blocks(len(parts), len(addresses))
        self.groups = [list(range(lo, hi)) for lo, hi in self.blocks]
        count = len(self.groups)
        # Sent with each group's first request, pickled once for all groups: the data's loaders and
        # the dense model pickled once per run, the step's model once per step.
        loaders = cluster.kept_once("loaders", data.loaders)
        model = Kept("model", uuid.uuid4().hex, current.SerializeToString())
        same = dense is current
        setup = _Setup(
            tuple(changing), dict(initial), same, loaders.key, data.specs, data.description, batch_size,
            len(parts), cluster.threads,
        )  # fmt: skip
        theirs = None if same else cluster.kept_once("dense", dense, dense.SerializeToString)
        self.opening = (Kept("setup", uuid.uuid4().hex, setup), model, theirs, loaders)
        self.residents = [self._place(g, addresses[g]) for g in range(count)]
        self.opened = [False] * count  # whether the group has run a request (else it replays them)
        self.pending: Weights = {}  # updates since the last request
        self.requests: list[Request] = []  # every layer's request so far (a new group replays them)
        self.next: DenseRequest | None = None
        self.guesses = _LAST_ROWS.setdefault(data, {})
        self.batch_size = batch_size
        log.info("refit: %d parts on %d workers", len(parts), count)

    def _place(self, g: int, worker: str | None) -> Placed:
        """Group ``g`` placed on ``worker`` (None: anywhere), to be opened by its first request.

        On its worker it is one placed ahead by the last refit (the same parts every step); one
        placed again after its worker was lost is placed now.
        """
        mine = self.groups[g]
        args = ([self.parts[p] for p in mine], [self.starts[p] for p in mine], mine[0])
        if worker is None:
            return self.cluster.place(_Group, args, worker)
        return self.cluster.place_ahead(_Group, args, worker)

    def update(self, new: Weights) -> None:
        """Sent to every group with the next layer's request."""
        self.pending.update(new)

    def equations(
        self, layer: LinearLayer, width: int, later: Sequence[LinearLayer], rng: np.random.Generator
    ) -> NormalEquations:
        """One round trip when the parts keep the rows they kept in the last refit, two otherwise.

        Every part's positions are drawn from the one seeded generator in the parts' order, and
        how many each part takes depends on the samples of all parts: the client plans them from
        the rows each part kept for this layer in the last step's refit, and a part sums its rows
        at once if it keeps those rows again. Otherwise (the first step, or rows that changed)
        the parts say what they keep, and a second request, planned from that, sums them.
        """
        self.requests.append((self.pending, layer, list(later)))
        self.pending = {}
        self.next = next(
            (
                dense_request(other, later[i + 1 :])
                for i, other in enumerate(later)
                if other.name in self.asking
            ),
            None,
        )  # the dense model's request of the next layer that asks, run ahead on the workers
        key = (layer.name, self.batch_size)
        guess = self.guesses.get(key)
        planned = None if guess is None else _draw(layer, width, guess, rng)
        rows, sums = self._ask(planned)
        self.guesses[key] = rows
        draw = _draw(layer, width, rows, rng)
        if draw is None:
            return short_equations(plan_rows(layer, width, rows).total)
        if planned is None or planned.rows != rows:
            _, sums = self._ask(draw, sums=True)
        _skip(rng, sum(draws(r, draw.takes) for r in rows))  # as if this process had drawn them all
        known = {}
        for block, block_sums in zip(self.blocks, sums, strict=True):
            assert block_sums is not None  # drawn as planned: every part summed its rows
            known[block] = block_sums
        return in_solver_order(layer, tree_sum(0, len(self.parts), known))

    def _ask(
        self, draw: _Draw | None, sums: bool = False
    ) -> tuple[list[PartRows], list[NormalEquations | None]]:
        """Per part, its rows of the last request's layer; per group, its sums if ``draw`` planned them.

        ``sums``: the layer has run; only its sums are asked. A group whose worker was lost is
        placed again (anywhere) and replays every request.
        """
        update, layer, later = self.requests[-1]
        mine = {g: draw.of(group) if draw is not None else None for g, group in enumerate(self.groups)}
        # The layer's request, pickled once for every group (a new group gets the earlier ones too).
        request = Payload((update, layer, later, self.next))
        only_sums: dict[int, bool] = {}

        def call(g: int) -> tuple[Placed, str, tuple[Any, ...]]:
            only_sums[g] = sums and self.opened[g]
            if only_sums[g]:
                return self.residents[g], "sums", (mine[g],)
            if self.opened[g]:
                return self.residents[g], "layer_rows", (None, request, mine[g])
            return self.residents[g], "layer_rows", (self.requests[:-1], request, mine[g], *self.opening)

        def replace(lost: Sequence[int]) -> None:
            log.warning("refit: groups %s lost their worker; rebuilding them", list(lost))
            for g in lost:
                self.residents[g], self.opened[g] = self._place(g, None), False

        answers = self.cluster.ask_all(len(self.groups), call, replace, f"refit of {layer.name}")
        rows: list[PartRows] = []
        sums_of: list[NormalEquations | None] = []
        for g, answer in enumerate(answers):
            self.opened[g] = True
            drawn = mine[g]
            group_rows, group_sums = (drawn.rows, answer) if only_sums[g] and drawn is not None else answer
            rows.extend(group_rows)
            sums_of.append(group_sums)
        return rows, sums_of
