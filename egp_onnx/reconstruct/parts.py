"""Where a refit's normal equations are summed: per part of its samples, here or on a cluster.

The refit sees the data's first :data:`MAX_SAMPLES` samples, cut into the parts of whole batches
a cluster's statistics pass uses (egp_onnx.load.parts). Each part's sums (Gram matrices, right-
hand sides, target energies) are taken alone and the parts' sums added in their order, in this
process (:class:`LocalSums`) as on a cluster (:class:`ClusterSums`), so the two give the same
bytes. A part's kept activations live where it is summed: on a cluster, on the worker the part
is pinned to, from one layer to the next; what moves per layer is the refit layer's new weights
to each part and the part's sums back, neither of which grows with the samples.

A layer on a cluster is two round trips: first each part runs its segments and says how many
samples of which output area it keeps (:func:`part_rows`), then, once the client has drawn the
positions' share of every part from the one seeded generator (``take`` depends on the samples of
all parts, and the generator's numbers are drawn in the parts' order), each part sums its rows.

A worker holds the parts pinned to it as one group (one set of kept activations: each segment
runs once over all of them). A worker that dies takes its group's activations with it: the next
task of the group, wherever it runs, finds none, and the client has it rebuilt there by
replaying every earlier layer's request with the weights it had (the same segments, so the same
bits as the first time).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx

from egp_onnx.errors import ConfigError
from egp_onnx.graph.weights import split_weights
from egp_onnx.load.calibration import CalibrationData, InputSpec
from egp_onnx.load.parts import DataPart, Loader, batch_parts, part_data, plan_parts
from egp_onnx.reconstruct.normal import (
    NormalEquations,
    PartRows,
    draws,
    enough_rows,
    layer_batches,
    merge_equations,
    normal_equations,
    part_equations,
    part_rows,
    plan_rows,
    short_equations,
)
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
#: Times a layer's tasks are sent again for parts whose worker was lost, before giving up.
RETRIES = 3

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
    """What a worker needs to open a part: the step's models and the part of the data."""

    key: str  # names this refit (one loop step)
    changing: tuple[str, ...]  # initializers the refit may change (stubs, as in the client)
    initial: Weights  # values changed before the first layer (unrefittable layers pruned)
    same: bool  # the dense model is the current one (the first step)
    loaders_key: str
    specs: Sequence[InputSpec]
    description: str
    batch_size: int
    parts: int  # parts the activations' budget is shared with
    threads: int  # onnxruntime threads of each model's segments (0: the cores')


@dataclass
class _GroupState:
    """A group's kept activations on a worker, between one layer's tasks and the next's."""

    now: Activations
    then: Activations
    values: Weights
    version: int  # updates applied so far
    kept: list[list[tuple[np.ndarray, ...]]] | None = None  # per part, the batches of the layer


_STATES: dict[tuple[str, int], _GroupState] = {}
#: A layer's request as the groups got it: the updates sent with it, the layer, the layers after it.
Request = tuple[Weights, "LinearLayer", list["LinearLayer"]]
_STATES_LOCK = threading.Lock()


def _open(
    setup: _Setup,
    current: bytes,
    dense: bytes | None,
    loaders: Sequence[Loader],
    parts: Sequence[DataPart],
    starts: Sequence[int],
) -> _GroupState:
    """A group's activations from the step's models, its parts' batches read from the shared data."""
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
    return _GroupState(*pair, values, 0)


def part_layer_rows(
    setup: _Setup,
    current: bytes,
    dense: bytes | None,
    loaders: Sequence[Loader],
    g: int,
    parts: Sequence[DataPart],
    starts: Sequence[int],
    since: int,
    version: int,
    update: Weights,
    replay: Sequence[Request] | None,
    layer: LinearLayer,
    later: Sequence[LinearLayer],
) -> tuple[str, list[PartRows]] | None:
    """A cluster task, the first of a layer: run group ``g``'s segments, say what rows each part keeps.

    A group is the parts pinned to one worker: one set of kept activations, so each segment
    runs in one session over all of them (each part still keeps, and is summed, on its own).
    Its activations first take the updates since the last layer's task (``since``: the version
    they should be at). None when the worker does not hold them (its worker was lost) and
    ``replay`` is None: the client then sends every earlier layer's request (``replay``), and
    they are opened again and run those requests in turn with the weights each had, so that
    every segment is the same as the first time (onnxruntime fuses a segment's nodes its own
    way: the same tensor from another cut of the graph may differ in its last bits).
    """
    from egp_onnx.runtime.cluster import worker_address

    with _STATES_LOCK:
        for other in [k for k in _STATES if k[0] != setup.key]:
            del _STATES[other]  # a new step: the last one's activations are not wanted any more
        state = _STATES.get((setup.key, g))
    if state is not None and state.version == since:
        state.values.update(update)
        state.version = version
    elif state is None or state.version != version:
        if replay is None and since > 0:
            return None
        state = _open(setup, current, dense, loaders, parts, starts)
        with one_blas_thread():
            for earlier, done, after in replay or []:
                state.values.update(earlier)
                layer_batches(done, state.now, state.then, after)
        state.values.update(update)
        state.version = version
        with _STATES_LOCK:
            _STATES[(setup.key, g)] = state
    with one_blas_thread():
        kept = layer_batches(layer, state.now, state.then, later)
    state.kept = kept
    return worker_address(), [part_rows(layer, part) for part in kept]


def part_layer_sums(
    key: str,
    g: int,
    version: int,
    layer: LinearLayer,
    takes: dict[int, int],
    rng_state: dict[str, Any],
    offsets: Sequence[int],
) -> list[NormalEquations] | None:
    """A cluster task, the second of a layer: each part's sums, its positions drawn its offset on.

    None when the group's rows of this layer are not here (its worker was lost in between).
    """
    with _STATES_LOCK:
        state = _STATES.get((key, g))
    if state is None or state.kept is None or state.version != version:
        return None
    sums = []
    for kept, offset in zip(state.kept, offsets, strict=True):
        bits = np.random.PCG64()
        bits.state = rng_state  # type: ignore[assignment]  # the state dict another PCG64 gave
        bits.advance(offset)
        with one_blas_thread():
            sums.append(part_equations(layer, kept, takes, np.random.Generator(bits)))
    state.kept = None
    return sums


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


class ClusterSums:
    """Each worker sums the parts pinned to it; the client adds the parts' sums in their order."""

    def __init__(
        self,
        cluster: Cluster,
        dense: onnx.ModelProto,
        current: onnx.ModelProto,
        changing: Sequence[str],
        initial: Weights,
        data: CalibrationData,
        batch_size: int,
    ) -> None:
        self.cluster = cluster
        parts, starts, seen = [], [], 0
        for part in plan_parts(data, batch_size, PART_SAMPLES):
            if seen >= MAX_SAMPLES:
                break
            parts.append(part)
            starts.append(seen)
            seen += part.samples
        self.parts, self.starts = parts, starts
        addresses = cluster.addresses
        # Part p goes to worker p mod n: groups of parts, one per worker (its activations one set).
        count = min(len(addresses), len(parts))
        self.groups = [list(range(g, len(parts), count)) for g in range(count)]
        self.where: list[str | None] = list(addresses[:count])
        self.loaders = cluster.share_once(data.loaders)
        # on the groups' workers only, not every worker of a large cluster
        key, self.current = cluster.share(current.SerializeToString(), workers=addresses[:count])
        self.same = dense is current
        self.dense = None if self.same else cluster.share_once_model(dense)
        self.key = key
        setup = _Setup(
            key, tuple(changing), dict(initial), self.same, self.loaders.key, data.specs,
            data.description, batch_size, len(parts), cluster.threads,
        )  # fmt: skip
        _, self.setup = cluster.share(setup, workers=addresses[:count])  # initial weights may be large
        self.version = 0  # updates so far
        self.sent = 0  # the version the groups were last brought to
        self.pending: Weights = {}  # updates since then
        self.requests: list[Request] = []  # every layer's request so far (a lost group replays them)
        log.info("refit: %d parts on %d workers", len(parts), count)

    def update(self, new: Weights) -> None:
        """Sent to every group with the next layer's first task."""
        self.version += 1
        self.pending.update(new)

    def equations(
        self, layer: LinearLayer, width: int, later: Sequence[LinearLayer], rng: np.random.Generator
    ) -> NormalEquations:
        """Two round trips: each part's rows, then (positions drawn per part) each part's sums."""
        since = self.sent
        self.requests.append((self.pending, layer, list(later)))
        self.sent, self.pending = self.version, {}
        rows = self._rows(since, range(len(self.groups)), rebuild=False)
        plan = plan_rows(layer, width, rows)
        if not enough_rows(plan.total, width):
            return short_equations(plan.total)
        state = _pcg(rng).state
        counts = [draws(r, plan.takes) for r in rows]
        offsets = np.cumsum([0, *counts[:-1]]).tolist()
        sums: list[list[NormalEquations] | None] = [None] * len(self.groups)
        todo = list(range(len(self.groups)))
        for attempt in range(RETRIES + 1):
            items = [
                (self.key, g, self.version, layer, plan.takes, state, [offsets[p] for p in self.groups[g]])
                for g in todo
            ]
            found = self.cluster.map(part_layer_sums, items, workers=[self.where[g] for g in todo])
            for g, normal in zip(todo, found, strict=True):
                sums[g] = normal
            todo = [g for g in todo if sums[g] is None]
            if not todo:
                break
            if attempt == RETRIES:
                raise ConfigError(f"refit of {layer.name}: groups {todo} lost {RETRIES} workers in turn")
            self._rows(since, todo, rebuild=True)  # rebuilt where they now run
        _skip(rng, sum(counts))  # as if this process had drawn every part's positions
        by_part: dict[int, NormalEquations] = {}
        for g, group in enumerate(self.groups):
            by_part.update(zip(group, sums[g] or [], strict=True))
        return merge_equations(layer, [by_part[p] for p in range(len(self.parts))])

    def _rows(self, since: int, which: Sequence[int], rebuild: bool) -> list[PartRows]:
        """Bring the groups ``which`` to the current weights and run the last request's segments.

        Returns every part's rows of those groups, in part order.
        """
        update, layer, later = self.requests[-1]
        found: dict[int, list[PartRows]] = {}
        todo = list(which)
        shared = (self.setup, self.current, self.dense, self.loaders)
        for attempt in range(RETRIES + 1):
            replay = self.requests[:-1] if rebuild else None
            items = [
                (
                    *shared, g, [self.parts[p] for p in self.groups[g]],
                    [self.starts[p] for p in self.groups[g]],
                    since, self.version, update, replay, layer, later,
                )  # fmt: skip
                for g in todo
            ]
            results = self.cluster.map(part_layer_rows, items, workers=[self.where[g] for g in todo])
            for g, result in zip(todo, results, strict=True):
                if result is not None:
                    self.where[g], found[g] = result
            todo = [g for g in todo if g not in found]
            if not todo:
                by_part = {p: r for g in which for p, r in zip(self.groups[g], found[g], strict=True)}
                return [by_part[p] for p in sorted(by_part)]
            if attempt == RETRIES:
                break
            log.warning("refit: groups %s lost their worker; rebuilding them", todo)
            rebuild = True
        raise ConfigError(f"refit of {layer.name}: groups {todo} lost {RETRIES} workers in turn")
