"""The EGP loop: statistics -> budget -> prune -> (guard) -> statistics, until the target sparsity."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx

from egp_onnx import entropy as ent
from egp_onnx.calibrate.collect import collect_statistics
from egp_onnx.config import Settings
from egp_onnx.entropy import Statistics
from egp_onnx.errors import GuardError
from egp_onnx.graph.rectifiers import RectifierSite, prunable_layers
from egp_onnx.graph.weights import initializer_arrays, replace_initializers
from egp_onnx.load.calibration import CalibrationData
from egp_onnx.prune import budget as prune
from egp_onnx.prune.finetune import Finetune, apply_finetune
from egp_onnx.reconstruct.refit import reconstruct
from egp_onnx.report.records import Fidelity, LayerFit, StepRecord, StopRecord

if TYPE_CHECKING:
    from egp_onnx.runtime.cluster import Cluster

log = logging.getLogger(__name__)

MAX_STEPS = 200


class Guard(Protocol):
    """Measures a candidate against the original: its fidelity and the guard's complaints."""

    @property
    def measures_only(self) -> bool:
        """True when it never complains (no thresholds): the step is kept whatever it measures."""

    def __call__(self, candidate: onnx.ModelProto) -> tuple[Fidelity, list[str]]:
        """The candidate's fidelity and the guard's complaints about it (empty: it passes)."""

    def shipped_problems(self, candidate: onnx.ModelProto) -> list[str]:
        """The complaints about the candidate in the form a last stage ships it in (INT8); none without."""


class LayerSet:
    """The prunable layers, the ReLU each owns, and their current weights."""

    def __init__(self, model: onnx.ModelProto, sites: list[RectifierSite]) -> None:
        self.sites = list(prunable_layers(sites).values())
        self.weight_names = [s.owner.weight for s in self.sites if s.owner]
        self._weights: list[np.ndarray] | None = None  # None: released (see release)
        self._source: onnx.ModelProto | None = None  # a model known to hold the weights
        self._nnz: np.ndarray | None = None  # counted when first asked (a pass over every weight)
        self.read(model)
        self._sizes = np.array([w.size for w in self.weights], dtype=np.int64)  # pruning keeps shapes

    @property
    def weights(self) -> list[np.ndarray]:
        """The current weights, in ``weight_names`` order (read-only arrays: replace, never write).

        After :meth:`release` they are read again from the model that holds them.
        """
        if self._weights is None:
            assert self._source is not None  # release() lets them go only when a model holds them
            self._weights = self._arrays(self._source)
        return self._weights

    @weights.setter
    def weights(self, value: list[np.ndarray]) -> None:
        self._weights = list(value)
        self._source = None  # no model is known to hold them
        self._nnz = None

    def read(self, model: onnx.ModelProto) -> None:
        """Take the weights ``model`` holds."""
        self.weights = self._arrays(model)
        self._source = model

    def _arrays(self, model: onnx.ModelProto) -> list[np.ndarray]:
        arrays = initializer_arrays(model, self.weight_names, writable=False)
        return [arrays[n] for n in self.weight_names]

    def release(self) -> None:
        """Let go of the weight arrays if a model holds the same values (read from or written into it).

        Counts stay. After the loop its result and that model's session hold the weights: kept here
        too, they were one more copy of every prunable weight while graph surgery ran and checked.
        """
        if self._source is not None:
            self.nnz()  # counted while the arrays are here
            self._weights = None

    def held(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        """The current weights by initializer name if ``model`` holds them (read from or written into it).

        Empty for any other model.
        """
        return dict(zip(self.weight_names, self.weights, strict=True)) if model is self._source else {}

    def nnz(self) -> np.ndarray:
        """Non-zero weights per layer (counted once per set of weights: they are never written)."""
        if self._nnz is None:
            self._nnz = np.array([np.count_nonzero(w) for w in self.weights], dtype=np.int64)
        return self._nnz.copy()

    def sizes(self) -> np.ndarray:
        """Weights per layer."""
        return self._sizes.copy()

    def entropies(self, stats: Statistics) -> np.ndarray:
        """Layer entropy of each layer's ReLU."""
        return np.array(
            [ent.layer_entropy(stats.counts[s.name].on, stats.counts[s.name].total) for s in self.sites]
        )

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` holding the current weights; ``model`` itself if they were read from it.

        The result is never modified afterwards, so sharing it saves a copy of every initializer.
        """
        if model is self._source:
            return model
        self._source = replace_initializers(model, dict(zip(self.weight_names, self.weights, strict=True)))
        return self._source


def step_counts(
    layers: LayerSet, stats: Statistics, method: str, step: float, needed: int, capacity: np.ndarray
) -> tuple[np.ndarray, str]:
    """How many weights each layer loses in this step, and the rule that decided it.

    ``capacity`` is how many more weights each layer may lose (its sparsity limit).
    """
    nnz = layers.nnz()
    if method == "magnitude":
        # The same schedule as EGP (a fraction of what is left per step), so that a finetune
        # callback retrains between steps (iterative magnitude pruning); without one, the steps
        # remove exactly what one global cut would.
        budget = min(max(1, int(np.floor(step * nnz.sum()))), needed)
        return prune.global_magnitude_amounts(layers.weights, budget, capacity), "magnitude"
    entropy = layers.entropies(stats)
    participating = (entropy > 0) & (capacity > 0)
    if not participating.any():
        # Every layer with weights left has zero entropy: EGP has nothing to guide it. Reach the
        # requested sparsity by global magnitude, and say so in the report.
        log.warning("no layer with positive entropy left; finishing by global magnitude")
        return prune.global_magnitude_amounts(layers.weights, needed, capacity), "magnitude-fallback"
    budget = min(max(1, int(np.floor(step * nnz[participating].sum()))), needed)
    mean_abs = np.array([prune.mean_abs_nonzero(w) for w in layers.weights])
    amounts = prune.egp_allocation(np.where(capacity > 0, entropy, 0.0), mean_abs, capacity, budget)
    return prune.integer_amounts(amounts, capacity, budget), "egp"


@dataclass(frozen=True)
class LoopOutcome:
    """The last accepted model of the loop, its statistics and the loop's history."""

    model: onnx.ModelProto
    stats: Statistics
    steps: tuple[StepRecord, ...]
    stop: StopRecord


#: The step search's resolution: once the last accepted and the smallest rejected sparsity are
#: closer than this fraction of the weights still left, no step in between is tried and the loop
#: stops (a step that small would not change the model's cost noticeably).
MIN_STEP = 0.02


@dataclass(frozen=True)
class LoopContext:
    """What the loop works on and with; it changes only through ``layers``.

    ``model`` is the original; ``limits`` the largest sparsity of each layer (by weight name, see
    :mod:`egp_onnx.prune.limits`); ``data`` the calibration data. ``caps`` are measured limits
    below ``limits`` (:mod:`egp_onnx.verify.sensitivity`): the budget goes within them first, and
    past them only once no layer has weights left within them, each step still under the guard.
    """

    model: onnx.ModelProto
    sites: list[RectifierSite]
    layers: LayerSet
    limits: Mapping[str, float]
    data: CalibrationData
    settings: Settings
    guard: Guard | None
    on_stage: Callable[[str], None]
    on_batch: Callable[[int], None]
    finetune: Finetune | None = None
    start_passes: bool = False  # ``model`` already passed the guard (channel removal's result)
    caps: Mapping[str, float] | None = None  # measured limits, spent first (None: ``limits`` only)
    cluster: Cluster | None = None  # where the statistics, refit sums and guard run (None: here)


@dataclass(frozen=True)
class StepOutcome:
    """One attempted step: its model, its record, the guard's complaints, its statistics if counted."""

    candidate: onnx.ModelProto
    record: StepRecord
    problems: list[str]
    stats: Statistics | None
    counts: np.ndarray  # weights removed per layer (``LayerSet.weight_names`` order)


@dataclass(frozen=True)
class GuardFailure:
    """The loop's last failed step when no step passed: what a report of the failure is made of."""

    steps: tuple[StepRecord, ...]
    candidate: onnx.ModelProto  # the last step's model, rejected
    removed: dict[str, int]  # weights that step removed, per layer (by weight initializer)


@dataclass
class _LoopState:
    """Where the loop stands: the last accepted model and its statistics, and the search's bounds.

    ``sparsity`` is the last accepted model's; ``rejected`` the smallest sparsity the guard has
    rejected (None: none yet). Between the two the next step bisects.
    """

    current: onnx.ModelProto
    stats: Statistics
    sparsity: float = 0.0
    rejected: float | None = None
    rejected_from: float = 0.0  # the sparsity of the model that ``rejected`` was pruned from
    steps: list[StepRecord] = field(default_factory=list)
    accepted: int = 0
    # The last accepted model known to pass in its shipped form (the start one passes: the channel
    # stage or the INT8 stage's check of the original saw to it), with its statistics, sparsity
    # and step; and whether every accepted step is now judged in that form (see run_loop).
    shipped: tuple[onnx.ModelProto, Statistics, float, int] | None = None
    shipped_each: bool = False

    def retry_ceiling(self) -> float | None:
        """The smallest rejected sparsity once more, if it was rejected from an earlier model.

        A verdict near the threshold can go either way; a ceiling found from a less pruned model
        is tried once from the current one before the search ends (then it is forgotten, or
        rejected again from here).
        """
        if self.rejected is None or self.rejected_from >= self.sparsity:
            return None
        ceiling, self.rejected = self.rejected, None
        return ceiling

    def next_target(self, target: float) -> float | None:
        """The sparsity the next step aims at: ``target``, or halfway to the smallest rejected one.

        None when that interval is below :data:`MIN_STEP` of the remaining weights.
        """
        if self.rejected is None:
            return target
        if self.rejected - self.sparsity < MIN_STEP * (1.0 - self.sparsity):
            return None
        return min(target, (self.sparsity + self.rejected) / 2)


def run_loop(ctx: LoopContext, stats: Statistics) -> LoopOutcome:
    """Prune ``ctx.layers`` step by step until ``settings.sparsity``; the layers end accepted.

    ``stats`` are the statistics of ``ctx.model``. Each step prunes, then (``settings.reconstruct``)
    refits the layers by least squares against the original (:mod:`egp_onnx.reconstruct.refit`).
    With ``finetune``, every pruned model is handed to it with its masks; the values it returns
    replace the model's tensors and the masks are applied again, so pruned weights stay zero. With
    a guard, a step whose model fails it is rolled back, and the next steps bisect between the last
    accepted and the smallest rejected sparsity until the two are within :data:`MIN_STEP` of the
    remaining weights; then the loop stops at the last accepted step.

    Raises:
        GuardError: no step passes the guard, down to the smallest step tried.

    """
    layers, settings = ctx.layers, ctx.settings
    rng = np.random.default_rng(settings.seed)
    total = int(layers.sizes().sum())
    target_zeros = int(round(settings.sparsity * total))
    limit = np.array([ctx.limits[n] for n in layers.weight_names])
    # The measured caps order the budget; they do not end the run: they are measured one layer at
    # a time, without the refit, so the guard (which judges refit steps) may allow more.
    capped = None if ctx.caps is None else np.minimum(limit, [ctx.caps[n] for n in layers.weight_names])
    state = _LoopState(ctx.model, stats, shipped=(ctx.model, stats, 0.0, 0))
    stop = _search(ctx, state, total, target_zeros, limit, capped, rng)
    back = _shipped_failure(ctx, state)
    if back is not None:
        log.warning(
            "%s; searching again from sparsity %.4f, each step judged as it ships", back, state.sparsity
        )
        stop = _search(ctx, state, total, target_zeros, limit, capped, rng)
    if stop is None:
        stop = StopRecord("target", state.accepted, f"reached sparsity {settings.sparsity}")
    if back is not None:
        stop = replace(stop, detail=f"{stop.detail} (searched again after {back})")
    return LoopOutcome(state.current, state.stats, tuple(state.steps), stop)


def _search(
    ctx: LoopContext,
    state: _LoopState,
    total: int,
    target_zeros: int,
    limit: np.ndarray,
    capped: np.ndarray | None,
    rng: np.random.Generator,
) -> StopRecord | None:
    """Step until the target (None), the guard's resolution or the layers' limits (the stop record)."""
    layers, settings = ctx.layers, ctx.settings
    stop: StopRecord | None = None
    while stop is None:
        nnz = layers.nnz()  # one count per step: it scans every weight
        zeros = total - int(nnz.sum())
        if target_zeros - zeros <= 0:
            break
        if len(state.steps) >= MAX_STEPS:
            stop = StopRecord("max-steps", state.accepted, f"stopped after {MAX_STEPS} steps")
            break
        aim = state.next_target(settings.sparsity)
        if aim is None:
            aim = state.retry_ceiling()
        if aim is None:
            stop = _converged(state)
            break
        # at least one weight, so that a search never stalls on a step that removes nothing
        needed = max(1, min(target_zeros, int(round(aim * total))) - zeros)
        capacity = prune.capacities(nnz, layers.sizes(), limit if capped is None else capped)
        counts, rule = step_counts(layers, state.stats, settings.method, settings.step, needed, capacity)
        if counts.sum() == 0 and capped is not None:
            log.info(
                "every layer is at its measured cap (sparsity %.4f); past them the guard decides",
                zeros / total,
            )
            capped = None
            continue
        if counts.sum() == 0:
            detail = "no prunable weight left to remove within the layers' limits"
            stop = StopRecord("no-weights-left", state.accepted, detail)
            break
        outcome = _attempt_step(ctx, state.current, counts, rule, len(state.steps) + 1, total, rng)
        if not outcome.problems and state.shipped_each and ctx.guard is not None:
            shipped = ctx.guard.shipped_problems(outcome.candidate)
            if shipped:
                record = replace(outcome.record, accepted=False, problems=tuple(shipped))
                outcome = replace(outcome, problems=shipped, record=record)
        if outcome.problems:
            stop = _roll_back(ctx, state, outcome)
        else:
            _accept(ctx, state, outcome)
    return stop


def _shipped_failure(ctx: LoopContext, state: _LoopState) -> str | None:
    """Why the search's result fails as it ships, once rolled back to a model that passes; None: it passes.

    The search judges its steps in float (the cheap verdict: a quantization costs a calibration
    run of its own) and asks the shipped form of its result only. When that fails, the loop goes
    back to the last model known to pass in that form (the start) and searches again, between it
    and the failed sparsity, each step that passes in float judged in that form too.
    """
    if ctx.guard is None or state.shipped is None or state.current is state.shipped[0]:
        return None
    problems = ctx.guard.shipped_problems(state.current)
    if not problems:
        return None
    failed = state.sparsity
    model, stats, sparsity, step = state.shipped
    ctx.layers.read(model)
    state.current, state.stats, state.sparsity, state.accepted = model, stats, sparsity, step
    state.rejected, state.rejected_from = failed, sparsity
    state.shipped_each = True
    return f"sparsity {failed:.4f} failed the guard as it ships ({'; '.join(problems)})"


def _attempt_step(
    ctx: LoopContext,
    current: onnx.ModelProto,
    counts: np.ndarray,
    rule: str,
    number: int,
    total: int,
    rng: np.random.Generator,
) -> StepOutcome:
    """Prune ``counts`` weights per layer from ``current``, finetune, and ask the guard."""
    candidate, fits = _prune_step(ctx, current, counts, rng, number)
    sparsity = 1.0 - float(ctx.layers.nnz().sum()) / total
    if ctx.finetune is not None:
        ctx.on_stage(f"step {number}: finetuning at sparsity {sparsity:.3f}")
        candidate = apply_finetune(candidate, ctx.layers, ctx.finetune)
    counted: Statistics | None = None
    fidelity: Fidelity | None
    if ctx.guard is not None and ctx.guard.measures_only:
        # A guard without thresholds only measures: the step is kept whatever it reads, so its
        # statistics pass need not wait for the verdict. It runs first, so that its session is
        # gone before the measurement builds the candidate's and the two never coexist.
        counted = _calibrate(ctx, candidate, number, sparsity)
        fidelity, problems = ctx.guard(candidate)
    else:
        fidelity, problems = ctx.guard(candidate) if ctx.guard else (None, [])
    record = StepRecord(
        step=number,
        method=rule,
        removed=int(counts.sum()),
        sparsity=sparsity,
        accepted=not problems,
        top1_agreement=fidelity.top1_agreement if fidelity else None,
        rel_error=fidelity.rel_error if fidelity else None,
        zero_entropy_layers=None,
        emptied_layers=int((ctx.layers.nnz() == 0).sum()),
        finetuned=ctx.finetune is not None,
        reconstructed=fits,
        estimate=fidelity.estimate if fidelity else None,
        problems=tuple(problems),
        iou=fidelity.region_iou if fidelity else None,
    )
    return StepOutcome(candidate, record, problems, counted, counts)


def _calibrate(ctx: LoopContext, candidate: onnx.ModelProto, number: int, sparsity: float) -> Statistics:
    """The statistics of a step's model on the calibration data."""
    ctx.on_stage(f"step {number}: calibrating at sparsity {sparsity:.3f}")
    held = ctx.layers.held(candidate)  # the session reads the loop's arrays, not a copy
    return collect_statistics(
        candidate, ctx.sites, ctx.data, ctx.settings.batch_size, ctx.on_batch, held, ctx.cluster
    )


def _roll_back(ctx: LoopContext, state: _LoopState, outcome: StepOutcome) -> StopRecord | None:
    """Undo a step that failed the guard: the next step aims lower (None), or the loop stops.

    Raises:
        GuardError: no step has been accepted and the search has reached its smallest step
            (unless the starting model passed the guard already: then the loop ends there).

    """
    state.steps.append(outcome.record)
    # back to the last accepted weights, read again from the model that holds them: kept
    # through the step instead, they were a second copy of every weight while it ran
    ctx.layers.read(state.current)
    number, sparsity, problems = outcome.record.step, outcome.record.sparsity, outcome.problems
    if state.rejected is None or sparsity <= state.rejected:
        state.rejected, state.rejected_from = sparsity, state.sparsity
    log.info("step %d (sparsity %.4f) failed the guard: %s", number, sparsity, "; ".join(problems))
    # the second search (shipped_each) starts from a model known to pass: it ends there
    first = state.accepted == 0 and not ctx.start_passes and not state.shipped_each
    if first and state.next_target(ctx.settings.sparsity) is None:
        tried = f"step 1 failed the guard at {len(state.steps)} sizes, down to sparsity {sparsity:.4f}"
        advice = "no model passes, nothing written (lower the guard's threshold or give more data)"
        removed = {n: int(c) for n, c in zip(ctx.layers.weight_names, outcome.counts, strict=True) if c > 0}
        failure = GuardFailure(tuple(state.steps), outcome.candidate, removed)
        raise GuardError(f"{tried}: {'; '.join(problems)}; {advice}", failure)
    return None


def _converged(state: _LoopState) -> StopRecord:
    """The stop record of a search whose accepted and rejected sparsities have met."""
    assert state.rejected is not None  # next_target gives None only once a step was rejected
    last = next(s for s in reversed(state.steps) if not s.accepted)
    detail = (
        f"the guard accepts sparsity {state.sparsity:.4f} and rejects {state.rejected:.4f}; a step in "
        f"between would remove less than {MIN_STEP:g} of the remaining weights (last rejected: step "
        f"{last.step}: {'; '.join(last.problems)})"
    )
    log.warning("%s; keeping the last accepted step", detail)
    return StopRecord("guard", state.accepted, detail)


def _accept(ctx: LoopContext, state: _LoopState, outcome: StepOutcome) -> None:
    """Make a step's model the last accepted one, with its statistics."""
    record = outcome.record
    state.accepted = record.step
    state.sparsity = record.sparsity
    stats = outcome.stats
    if stats is None:
        stats = _calibrate(ctx, outcome.candidate, record.step, record.sparsity)
    state.stats = stats
    entropies = ctx.layers.entropies(stats)
    state.steps.append(replace(record, zero_entropy_layers=int((entropies == 0).sum())))
    state.current = outcome.candidate
    if state.shipped_each:  # judged as it ships: where a failure would go back to
        state.shipped = (state.current, stats, state.sparsity, state.accepted)


def _prune_step(
    ctx: LoopContext, current: onnx.ModelProto, counts: np.ndarray, rng: np.random.Generator, number: int
) -> tuple[onnx.ModelProto, tuple[LayerFit, ...]]:
    """Remove ``counts`` weights per layer (and refit, when asked); ``layers`` gets the new weights."""
    layers, settings = ctx.layers, ctx.settings
    if not settings.reconstruct:
        pairs = zip(layers.weights, counts, strict=True)
        layers.weights = [prune.prune_smallest(w, int(c), rng) for w, c in pairs]
        return layers.apply(current), ()
    remove = {name: int(c) for name, c in zip(layers.weight_names, counts, strict=True) if c > 0}

    def on_layer(name: str) -> None:
        ctx.on_stage(f"step {number}: reconstructing {name}")

    model = layers.apply(current)
    result = reconstruct(
        ctx.model,
        model,
        ctx.data,
        settings.batch_size,
        remove=remove,
        masked=layers.weight_names,
        select=settings.select,
        seed=settings.seed + number,
        on_layer=on_layer,
        known=layers.held(model),  # the loop's arrays, not a second copy of every weight
        cluster=ctx.cluster,
    )
    layers.read(result.model)
    return result.model, result.fits
