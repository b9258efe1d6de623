"""The EGP loop: statistics -> budget -> prune -> (guard) -> statistics, until the target sparsity."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx

from egp_onnx import entropy as ent
from egp_onnx.calibrate.collect import Statistics, collect_statistics
from egp_onnx.config import Settings
from egp_onnx.errors import EgpError, FinetuneError, GuardError, one_line
from egp_onnx.graph.topology import (
    RectifierSite,
    initializer_arrays,
    prunable_layers,
    replace_initializers,
    replace_tensors,
    tensor_values,
)
from egp_onnx.load.calibration import CalibrationData
from egp_onnx.prune import budget as prune
from egp_onnx.reconstruct.refit import reconstruct
from egp_onnx.report.records import Fidelity, LayerFit, StepRecord, StopRecord

log = logging.getLogger(__name__)

MAX_STEPS = 200

#: Measures a candidate against the original: its fidelity and the guard's complaints.
Guard = Callable[[onnx.ModelProto], tuple[Fidelity, list[str]]]

#: Retrains a pruned model: gets the model and, per prunable initializer, the mask of kept weights;
#: returns the retrained model (same initializer names) or new values for some of its tensors.
Finetune = Callable[[onnx.ModelProto, dict[str, np.ndarray]], "onnx.ModelProto | Mapping[str, np.ndarray]"]


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


#: A step that fails the guard is retried this many times, each at half the previous size.
RETRIES = 2


def run_loop(
    model: onnx.ModelProto,
    sites: list[RectifierSite],
    layers: LayerSet,
    limits: Mapping[str, float],
    stats: Statistics,
    data: CalibrationData,
    settings: Settings,
    guard: Guard | None,
    on_stage: Callable[[str], None],
    on_batch: Callable[[int], None],
    finetune: Finetune | None = None,
) -> LoopOutcome:
    """Prune ``layers`` step by step until ``settings.sparsity``; ``layers`` ends accepted.

    ``limits`` is the largest sparsity of each layer (by weight name, see :mod:`egp_onnx.prune.limits`).
    ``stats`` are the statistics of ``model``. Each step prunes, then (``settings.reconstruct``)
    refits the layers by least squares against ``model`` (:mod:`egp_onnx.reconstruct.refit`). With
    ``finetune``, every pruned model is handed to it with its masks; the values it returns replace
    the model's tensors and the masks are applied again, so pruned weights stay zero. With a
    guard, a step whose model fails it is rolled back and retried at half its size
    (:data:`RETRIES` times); then the loop stops there.

    Raises:
        GuardError: the very first step already fails the guard.

    """
    rng = np.random.default_rng(settings.seed)
    total = int(layers.sizes().sum())
    target_zeros = int(round(settings.sparsity * total))
    limit = np.array([limits[n] for n in layers.weight_names])
    current = model  # the last accepted model: pruned weights, refit or finetuned other tensors
    steps: list[StepRecord] = []
    stop = StopRecord("target", 0, f"reached sparsity {settings.sparsity}")
    step, retries, accepted = settings.step, 0, 0
    while True:
        nnz = layers.nnz()  # one count per step: it scans every weight
        needed = target_zeros - (total - int(nnz.sum()))
        if needed <= 0:
            break
        if len(steps) >= MAX_STEPS:
            stop = StopRecord("max-steps", accepted, f"stopped after {MAX_STEPS} steps")
            break
        capacity = prune.capacities(nnz, layers.sizes(), limit)
        counts, rule = step_counts(layers, stats, settings.method, step, needed, capacity)
        if counts.sum() == 0:
            detail = "no prunable weight left to remove within the layers' limits"
            stop = StopRecord("no-weights-left", accepted, detail)
            break
        number = len(steps) + 1
        candidate, fits = _prune_step(model, current, layers, counts, data, settings, rng, number, on_stage)
        sparsity = 1.0 - float(layers.nnz().sum()) / total
        if finetune is not None:
            on_stage(f"step {number}: finetuning at sparsity {sparsity:.3f}")
            candidate = _finetuned(candidate, layers, finetune)
        counted: Statistics | None = None
        fidelity: Fidelity | None
        if guard is not None and settings.min_agreement is None and settings.max_rel_error is None:
            # A guard without thresholds only measures: the step is kept whatever it reads, so its
            # statistics pass need not wait for the verdict. It runs first, and its session is gone
            # before the measurement builds the candidate's (kept for graph surgery's check): run
            # beside each other, the two sessions were built at once (VGG-19, the whole run: peak
            # 4.1 against 3.5 GB, 1-3 s faster).
            on_stage(f"step {number}: calibrating at sparsity {sparsity:.3f}")
            held = layers.held(candidate)  # the session reads the loop's arrays, not a copy
            counted = collect_statistics(candidate, sites, data, settings.batch_size, on_batch, held)
            fidelity, problems = guard(candidate)
        else:
            fidelity, problems = guard(candidate) if guard else (None, [])
        record = StepRecord(
            step=number,
            method=rule,
            removed=int(counts.sum()),
            sparsity=sparsity,
            accepted=not problems,
            top1_agreement=fidelity.top1_agreement if fidelity else None,
            rel_error=fidelity.rel_error if fidelity else None,
            zero_entropy_layers=None,
            emptied_layers=int((layers.nnz() == 0).sum()),
            finetuned=finetune is not None,
            reconstructed=fits,
        )
        if problems:
            steps.append(record)
            # back to the last accepted weights, read again from the model that holds them: kept
            # through the step instead, they were a second copy of every weight while it ran
            layers.read(current)
            detail = f"step {number} (sparsity {sparsity:.4f}) failed the guard: {'; '.join(problems)}"
            if retries < RETRIES:
                retries += 1
                step /= 2
                log.info("%s; retrying at half the step (%.4g)", detail, step)
                continue
            if accepted == 0:
                tried = f"step 1 failed the guard at {len(steps)} sizes, down to sparsity {sparsity:.4f}"
                advice = "no model passes, nothing written (lower --step or the guard)"
                raise GuardError(f"{tried}: {'; '.join(problems)}; {advice}")
            log.warning("%s; keeping the last accepted step", detail)
            stop = StopRecord("guard", accepted, detail)
            break
        retries = 0
        accepted = number
        if counted is None:
            on_stage(f"step {number}: calibrating at sparsity {sparsity:.3f}")
            held = layers.held(candidate)
            counted = collect_statistics(candidate, sites, data, settings.batch_size, on_batch, held)
        stats = counted
        entropies = layers.entropies(stats)
        steps.append(replace(record, zero_entropy_layers=int((entropies == 0).sum())))
        current = candidate
    if stop.reason == "target":
        stop = StopRecord("target", accepted, stop.detail)
    return LoopOutcome(current, stats, tuple(steps), stop)


def _prune_step(
    dense: onnx.ModelProto,
    current: onnx.ModelProto,
    layers: LayerSet,
    counts: np.ndarray,
    data: CalibrationData,
    settings: Settings,
    rng: np.random.Generator,
    number: int,
    on_stage: Callable[[str], None],
) -> tuple[onnx.ModelProto, tuple[LayerFit, ...]]:
    """Remove ``counts`` weights per layer (and refit, when asked); ``layers`` gets the new weights."""
    if not settings.reconstruct:
        pairs = zip(layers.weights, counts, strict=True)
        layers.weights = [prune.prune_smallest(w, int(c), rng) for w, c in pairs]
        return layers.apply(current), ()
    remove = {name: int(c) for name, c in zip(layers.weight_names, counts, strict=True) if c > 0}

    def on_layer(name: str) -> None:
        on_stage(f"step {number}: reconstructing {name}")

    model = layers.apply(current)
    result = reconstruct(
        dense,
        model,
        data,
        settings.batch_size,
        remove=remove,
        masked=layers.weight_names,
        select=settings.select,
        seed=settings.seed + number,
        on_layer=on_layer,
        known=layers.held(model),  # the loop's arrays, not a second copy of every weight
    )
    layers.read(result.model)
    return result.model, result.fits


def _finetuned(candidate: onnx.ModelProto, layers: LayerSet, finetune: Finetune) -> onnx.ModelProto:
    """Run the callback, take its tensor values, and hold the masks: pruned weights stay zero."""
    masks = {name: w != 0 for name, w in zip(layers.weight_names, layers.weights, strict=True)}
    name = getattr(finetune, "__qualname__", type(finetune).__name__)
    try:
        returned = finetune(candidate, {k: v.copy() for k, v in masks.items()})
    except EgpError:
        raise
    except Exception as exc:  # the user's training code may fail in any way
        raise FinetuneError(
            f"the finetune callback {name} failed: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    values = finetune_values(returned, candidate, layers.weight_names, name)
    retrained = replace_tensors(candidate, values)
    arrays = initializer_arrays(retrained, layers.weight_names)
    layers.weights = [arrays[n] * masks[n] for n in layers.weight_names]
    return layers.apply(retrained)


def finetune_values(
    returned: object, candidate: onnx.ModelProto, required: list[str], name: str = "finetune"
) -> dict[str, np.ndarray]:
    """The tensor values a finetune callback returned, checked against ``candidate``.

    Every name must be a tensor of the model, with the same shape and dtype, and floating values
    must be finite: anything else would be broadcast, cast or written into the model.

    Raises:
        FinetuneError: one line naming the callback and the first bad tensor.

    """
    callback = f"the finetune callback {name}"
    if isinstance(returned, onnx.ModelProto):
        values = tensor_values(returned)
        missing = sorted(set(required) - values.keys())
        if missing:
            raise FinetuneError(
                f"{callback} returned a model without the tensors {', '.join(missing[:3])}; "
                "return a model with the same initializer names, or a dict of new tensor values"
            )
    elif isinstance(returned, Mapping):
        values = {}
        for key, value in returned.items():
            try:
                values[str(key)] = np.asarray(value)
            except Exception as exc:  # e.g. a torch tensor that still requires grad
                raise FinetuneError(
                    f"{callback} returned a value for '{key}' that is not an array ({type(value).__name__}: "
                    f"{one_line(exc)})"
                ) from exc
    else:
        raise FinetuneError(
            f"{callback} returned {type(returned).__name__}; expected an onnx.ModelProto or a dict"
        )
    current = tensor_values(candidate)
    for key, value in values.items():
        want = current.get(key)
        if want is None:
            raise FinetuneError(f"{callback} returned unusable values: {key} is not a tensor of the model")
        if value.shape != want.shape:
            raise FinetuneError(
                f"{callback} returned tensor '{key}' with shape {value.shape}; the model's is {want.shape}"
            )
        if value.dtype != want.dtype:
            raise FinetuneError(
                f"{callback} returned tensor '{key}' as {value.dtype}; the model's is {want.dtype} "
                f"(convert with .astype(np.{want.dtype.name}))"
            )
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise FinetuneError(f"{callback} returned tensor '{key}' with NaN or Inf values")
    return values
