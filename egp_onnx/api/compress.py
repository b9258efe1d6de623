"""The pipeline: load -> calibrate -> entropy -> budget/prune -> surgery -> verify -> report.

``analyze`` and ``compress`` are the public API; the CLI is a thin layer over them. Neither
mutates the caller's model: ``compress`` returns a new model with its report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import numpy as np
import onnx

from egp_onnx import entropy as ent
from egp_onnx.api.summary import layer_records, model_summary
from egp_onnx.calibrate.collect import Statistics, collect_statistics
from egp_onnx.config import (
    DEFAULT_MAX_REL_ERROR,
    DEFAULT_MIN_AGREEMENT,
    METHODS,
    SPARSITY_CEILING,
    Settings,
)
from egp_onnx.errors import CalibrationError, ConfigError, EgpError, NothingToPruneError
from egp_onnx.graph.topology import (
    REMOVABLE_KINDS,
    RectifierSite,
    find_rectifiers,
    initializer_counts,
    shape_skeleton,
    split_weights,
)
from egp_onnx.load.calibration import CalibrationData, CalibrationDataReader, open_calibration, split_holdout
from egp_onnx.load.model import checked_split, load_model, load_statistics, model_fingerprint, prepare_model
from egp_onnx.prune.limits import sparsity_limits
from egp_onnx.prune.loop import Finetune, LayerSet, run_loop
from egp_onnx.report.records import (
    AnalysisReport,
    CompressionReport,
    CostComparison,
    Fidelity,
    RectifierRecord,
    SurgeryRecord,
)
from egp_onnx.runtime.memory import trim
from egp_onnx.surgery import ChannelStates, simplify
from egp_onnx.verify.cost import model_cost
from egp_onnx.verify.fidelity import (
    Outputs,
    Prepared,
    Reference,
    compare,
    compare_latency,
    latency_feeds,
    passes,
)

log = logging.getLogger(__name__)

__all__ = ["METHODS", "CompressionResult", "Progress", "Settings", "analyze", "compress", "statistics"]

ModelSource = str | os.PathLike[str] | onnx.ModelProto
DataSource = str | os.PathLike[str] | CalibrationDataReader | CalibrationData


class Progress(Protocol):
    """Receives progress events; the CLI draws them, the library only reports them."""

    def stage(self, text: str) -> None:
        """A new stage starts (e.g. a calibration pass of step 2)."""

    def advance(self, samples: int) -> None:
        """``samples`` more calibration samples went through the model."""


class _Silent:
    def stage(self, text: str) -> None:
        log.info(text)

    def advance(self, samples: int) -> None:
        pass


@dataclass(frozen=True)
class CompressionResult:
    """The compressed model and the report that describes it."""

    model: onnx.ModelProto
    report: CompressionReport


def _load(model: ModelSource) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return prepare_model(model), "<ModelProto>"
    return load_model(model), str(model)


def _open(
    data: DataSource, model: onnx.ModelProto, mean: Sequence[float], std: Sequence[float], workers: int = 0
) -> CalibrationData:
    if isinstance(data, CalibrationData):
        return data
    return open_calibration(data, model, mean=mean, std=std, workers=workers)


def _site_record(site: RectifierSite, stats: Statistics) -> RectifierRecord:
    counts = stats.counts[site.name]
    on, off = ent.constant_channels(counts.on, counts.total)
    owner = site.owner
    return RectifierRecord(
        name=owner.name if owner else None,
        op_type=owner.op_type if owner else None,
        rectifier=site.name,
        activation=site.op_type,
        prunable=site.prunable,
        channels=int(counts.on.size),
        always_on=int(on.sum()),
        always_off=int(off.sum()),
        entropy=ent.layer_entropy(counts.on, counts.total),
        on_fraction=float(ent.on_fraction(counts.on, counts.total).mean()) if counts.on.size else 0.0,
    )


def statistics(
    model: ModelSource,
    calib: DataSource | None = None,
    *,
    stats: Sequence[str | os.PathLike[str]] = (),
    batch_size: int = 32,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    workers: int = 0,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, str, list[RectifierSite], Statistics]:
    """Counts of every rectifier of ``model``: from ``calib``, from saved ``stats`` files, or both merged.

    Returns:
        The loaded model, its source name, its rectifier sites and their statistics.

    Raises:
        EgpError: bad model, data, statistics files or options.

    """
    Settings(batch_size=batch_size).check()
    if calib is None and not stats:
        raise ConfigError("give calibration data (--calib) or statistics files (--stats)")
    proto, source = _load(model)
    sites = find_rectifiers(proto)
    merged = _stats_files(stats, proto, sites) if stats else None
    if calib is not None:
        data = _open(calib, proto, mean, std, workers)
        progress = progress or _Silent()
        progress.stage("calibrating")
        counted = collect_statistics(proto, sites, data, batch_size, progress.advance)
        merged = counted if merged is None else merged.merged(counted)
    assert merged is not None  # one of the two sources was given
    return proto, source, sites, merged


def _stats_files(
    paths: Sequence[str | os.PathLike[str]], model: onnx.ModelProto, sites: list[RectifierSite]
) -> Statistics:
    """Merged statistics files, checked to belong to ``model``."""
    stats = load_statistics(paths, model_fingerprint(model))
    if set(stats.counts) != {s.name for s in sites}:
        raise CalibrationError("the statistics files do not cover this model's rectifiers")
    return stats


def analyze(
    model: ModelSource,
    calib: DataSource | None = None,
    *,
    stats: Sequence[str | os.PathLike[str]] = (),
    batch_size: int = 32,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    workers: int = 0,
    progress: Progress | None = None,
) -> AnalysisReport:
    """Measure the entropy of every rectifier of ``model`` on the calibration data.

    ``stats`` are files written by :func:`statistics` / `egp-onnx stats` for the same model, e.g.
    shards of a calibration set counted on different machines; they are merged exactly.

    Raises:
        EgpError: bad model, data or options (a one-line message).

    """
    proto, source, sites, stats_ = statistics(
        model,
        calib,
        stats=stats,
        batch_size=batch_size,
        mean=mean,
        std=std,
        workers=workers,
        progress=progress,
    )
    return AnalysisReport(
        source=source,
        samples=stats_.samples,
        layers=tuple(_site_record(s, stats_) for s in sites),
    )


def compress(
    model: ModelSource,
    calib: DataSource,
    *,
    sparsity: float = SPARSITY_CEILING,
    step: float = 0.5,
    method: str = "egp",
    batch_size: int = 32,
    seed: int = 0,
    surgery: bool = True,
    merge_tolerance: float = 0.0,
    eval_data: DataSource | None = None,
    holdout: float | None = None,
    min_agreement: float | None = None,
    max_rel_error: float | None = None,
    guard: bool = True,
    reconstruct: bool = True,
    select: str = "magnitude",
    layer_cap: float = 0.98,
    latency: bool = True,
    stats: Sequence[str | os.PathLike[str]] = (),
    finetune: Finetune | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    workers: int = 0,
    progress: Progress | None = None,
) -> CompressionResult:
    """Prune ``model`` toward ``sparsity`` of its prunable weights with Entropy-Guided Pruning.

    Each step measures the rectifiers' entropy on the calibration data, removes ``step`` of the
    remaining weights of the positive-entropy layers where the EGP budget puts them, refits the
    layers by least squares so they reproduce the original (``reconstruct``), and measures
    again. ``method="magnitude"`` spends the same total budget by global magnitude. Graph surgery
    then makes the pruned model shallower. Fidelity against the original is measured on
    ``eval_data`` (or a ``holdout`` split of the calibration data, automatic by default); the
    guard (on by default: top-1 agreement >= 0.99 for classifier outputs, else relative error
    <= 0.05) rolls back a step that breaks it, retries it at half its size, and stops there:
    the default target is "as far as the guard allows", up to ``sparsity``.

    Args:
        model: path to an ONNX file or a ModelProto (not modified).
        calib: calibration data (see :func:`egp_onnx.load.calibration.open_calibration`).
        sparsity: fraction of the prunable weights to zero, in [0, 1); with the guard, a ceiling.
        step: fraction of the remaining weights removed per EGP step, in (0, 1].
        method: ``egp`` or ``magnitude``.
        batch_size: samples per onnxruntime call.
        seed: order among weights of equal magnitude, and the holdout split.
        surgery: reduce depth after pruning (fold, bypass, merge, delete layers).
        merge_tolerance: largest relative output error, measured on the calibration data, at
            which a merge that is not exact is applied; 0 applies exact rewrites only.
        eval_data: held-out data in any calibration format; ``labels`` give accuracy.
        holdout: fraction of the calibration data split off as held-out data (no eval_data);
            None: min(max(500, N/4), N/2) samples, or none when N < 4.
        min_agreement: the guard's lowest top-1 agreement with the original.
        max_rel_error: the guard's largest relative output error against the original.
        guard: False turns the guard off (then the loop runs to ``sparsity`` unchecked).
        reconstruct: refit pruned and downstream layers by ridge least squares after every step.
        select: which weights a layer loses: ``magnitude`` (smallest |w|) or ``obs`` (OBS
            saliency on the normal equations; needs ``reconstruct``).
        layer_cap: largest sparsity of a layer that every path to the outputs needs.
        latency: measure onnxruntime latency before and after.
        stats: statistics files of the original model (`egp-onnx stats`) used for the first step
            instead of a calibration pass; later steps measure the pruned model on ``calib``.
        finetune: called after every pruning step with the pruned model and its masks (per
            prunable initializer, True where a weight is kept); returns the retrained model or new
            tensor values (see :mod:`egp_onnx.integrations.torch` for a ready PyTorch one). Masks are applied
            again to what it returns.
        mean: image normalisation (image folders only).
        std: image normalisation (image folders only).
        workers: threads that load calibration shards ahead.
        progress: receives progress events.

    Raises:
        EgpError: bad model, data or options; NothingToPruneError if no layer can be pruned;
            GuardError if even the first step breaks the guard.

    """
    settings = Settings(
        sparsity=sparsity,
        step=step,
        method=method,
        batch_size=batch_size,
        seed=seed,
        surgery=surgery,
        merge_tolerance=merge_tolerance,
        holdout=holdout,
        min_agreement=min_agreement,
        max_rel_error=max_rel_error,
        guard=guard,
        reconstruct=reconstruct,
        select=select,
        layer_cap=layer_cap,
        latency=latency,
        finetune=None if finetune is None else getattr(finetune, "__qualname__", type(finetune).__name__),
    )
    settings.check()
    if eval_data is not None and holdout:
        raise ConfigError("give either --eval or --holdout, not both")
    if select == "obs" and not reconstruct:
        raise ConfigError("--select obs needs reconstruction; drop --no-reconstruct")
    proto, source = _load(model)
    data = _open(calib, proto, mean, std, workers)
    if eval_data is not None:
        held, held_name = _open(eval_data, proto, mean, std, workers), "eval"
    elif holdout is None or holdout > 0:
        data, held = split_holdout(data, holdout, seed)
        held_name = "holdout"
    else:
        held, held_name = data, "calibration"
    progress = progress or _Silent()
    sites = find_rectifiers(proto)
    layers = LayerSet(proto, sites)
    if not layers.sites:
        raise NothingToPruneError(
            f"{source}: no Conv/Gemm/MatMul layer with an initializer weight feeds a ReLU; no output written"
        )
    limits = sparsity_limits(proto, layers.weight_names, layer_cap)
    if sparsity > 0 and not any(limits.values()):
        raise NothingToPruneError(
            f"{source}: every prunable layer feeds a graph output directly, and output layers stay dense; "
            "no output written"
        )
    # With latency on, the original's session that computes the reference outputs is kept for the
    # latency measurement (one session build less; it has already run the timed batch size); it
    # comes without the model's weights, which after the loop only the session holds.
    original: onnx.ModelProto | Prepared = _weightless(proto, layers.held(proto)) if latency else proto
    with ThreadPoolExecutor(1, thread_name_prefix="egp-reference") as pool:
        # The reference outputs are computed while the statistics pass runs: that pass gives each
        # batch in flight one core, so on a few batches the other is idle (and building a session
        # takes mostly one core). One data source is never read from two threads.
        pending = pool.submit(Reference, original, held, batch_size) if held is not data else None
        if stats:
            first_stats = _stats_files(stats, proto, sites)
        else:
            progress.stage("calibrating the original model")
            first_stats = collect_statistics(
                proto, sites, data, batch_size, progress.advance, layers.held(proto)
            )
        progress.stage(f"running the original model on the {held_name} data")
        reference = pending.result() if pending is not None else Reference(original, held, batch_size)
    nnz_before = layers.nnz()
    feed = reference.first_feed()
    shapes = {name: (1, *array.shape[1:]) for name, array in feed.items()}
    # the original's cost is taken while its weights are at hand (after the loop they are gone)
    held_counts = original.counts if isinstance(original, Prepared) else None
    cost_before = model_cost(proto, shapes, held_counts or initializer_counts(proto, layers.held(proto)))
    settings = _default_guard(settings, reference)
    check = _Guard(reference, settings, layers)  # without thresholds it measures and never complains
    outcome = run_loop(
        proto,
        sites,
        layers,
        limits,
        first_stats,
        data,
        settings,
        check,
        progress.stage,
        progress.advance,
        finetune,
    )
    pruned = _strip_value_info(outcome.model, in_place=outcome.model is not proto)
    layers.release()  # the loop's weights are in the pruned model (and the guard's session of it)
    # From here on the original's graph is enough: its weights go (kept by nothing else unless the
    # loop's result is the original itself; its session, when kept, holds its own copy of them).
    outline = shape_skeleton(proto)
    del proto
    trim()  # what the loop freed leaves the process before surgery builds the rewritten model's session
    final, surgery_record = pruned, SurgeryRecord(False, merge_tolerance, (), 0, None, None, False, None)
    states: dict[str, str] = {}
    fidelity: Fidelity | None = None
    # What the measurements run, with its session when one was built: the pruned model with the
    # guard's, then the rewritten model with the one that checked it.
    run: onnx.ModelProto | Prepared = check.prepared(pruned)
    if surgery:
        progress.stage("reducing depth")
        run, surgery_record, states = _reduce_depth(run, sites, outcome.stats, data, settings)
        final = run.model if isinstance(run, Prepared) else run
        if final is not pruned:
            fidelity, problems = check(run)
            if problems:
                reason = f"the rewritten model fails the guard on the {held_name} data: {'; '.join(problems)}"
                log.warning("%s; keeping the pruned model", reason)
                final, states, fidelity, run = pruned, {}, None, pruned
                surgery_record = replace(surgery_record, reverted=True, revert_reason=reason)
    progress.stage("measuring the result")
    if fidelity is None:  # the guard has not measured the model being written yet
        fidelity = reference.evaluate(run)
    # the weights that the session already holds are counted without reading the protobuf again
    cost_after = model_cost(final, shapes, run.counts if isinstance(run, Prepared) else None)
    timing = compare_latency(original, run, latency_feeds(outline, feed)) if latency else None
    report = CompressionReport(
        source=source,
        settings=asdict(settings),
        samples=outcome.stats.samples,
        layers=layer_records(layers, first_stats, outcome.stats, nnz_before, states),
        steps=outcome.steps,
        stop=outcome.stop,
        model=model_summary(layers, first_stats, outcome.stats, outline, final, cost_before, cost_after),
        surgery=surgery_record,
        fidelity=replace(fidelity, data=held_name),
        cost=CostComparison(cost_before, cost_after),
        timing=timing,
    )
    return CompressionResult(model=final, report=report)


def _default_guard(settings: Settings, reference: Reference) -> Settings:
    """The guard's thresholds: the user's, else agreement for classifiers and relative error otherwise."""
    if not settings.guard or settings.min_agreement is not None or settings.max_rel_error is not None:
        return settings
    if reference.classifier():
        return replace(settings, min_agreement=DEFAULT_MIN_AGREEMENT)
    return replace(settings, max_rel_error=DEFAULT_MAX_REL_ERROR)


class _Guard:
    """Fidelity of a candidate against the original, and the guard's complaints about it (a Guard).

    It keeps the session of the last candidate it measured: when that candidate is the loop's
    result, graph surgery's check takes the pruned model's outputs from the same session instead
    of building another (2.5 s for VGG-19, 575 MB). Until then that session stays in memory: in a
    run of several steps, also through the next step's pruning and reconstruction (1.2 times the
    model's size on VGG-19).
    """

    def __init__(self, reference: Reference, settings: Settings, layers: LayerSet) -> None:
        self.reference, self.settings, self.layers = reference, settings, layers
        self._last: Prepared | None = None

    def __call__(self, candidate: onnx.ModelProto | Prepared) -> tuple[Fidelity, list[str]]:
        # the session reads the loop's copy of the pruned weights, not a new one
        prepared = (
            candidate
            if isinstance(candidate, Prepared)
            else Prepared(candidate, known=self.layers.held(candidate))
        )
        self._last = prepared
        fidelity = self.reference.evaluate(prepared, SURGERY_ATOL, SURGERY_RTOL)
        return fidelity, passes(fidelity, self.settings.min_agreement, self.settings.max_rel_error)

    def prepared(self, model: onnx.ModelProto) -> onnx.ModelProto | Prepared:
        """``model`` with its session if it was the last candidate measured, else ``model``; forgets it."""
        last, self._last = self._last, None
        return last if last is not None and last.model is model else model


#: A rewritten model with an output element y' such that |y' - y| > SURGERY_ATOL + SURGERY_RTOL |y|
#: against the pruned model's y on the calibration data is a defect: the pruned model is kept
#: instead. Per element, as ``verify`` checks, so that outputs of tiny magnitude (a detection
#: map's sigmoid at 1e-6) do not read onnxruntime's own rounding as a large relative error.
SURGERY_ATOL = 1e-4
SURGERY_RTOL = 1e-3
#: With ``--merge-tolerance`` > 0 and an inexact merge applied, the check is instead the relative
#: L2 error of each output, at most the tolerance plus this.
SURGERY_CHECK = 1e-4


def _reduce_depth(
    pruned: onnx.ModelProto | Prepared,
    sites: list[RectifierSite],
    stats: Statistics,
    data: CalibrationData,
    settings: Settings,
) -> tuple[onnx.ModelProto | Prepared, SurgeryRecord, dict[str, str]]:
    """Run graph surgery on the pruned model and check it against the pruned model.

    Returns:
        ``pruned`` (surgery reverted) or the rewritten model with the session that checked it,
        for the measurements that follow; the record; the layers' states.

    """
    model = pruned.model if isinstance(pruned, Prepared) else pruned
    # Always-ON / always-OFF channels are read off a sample: removing them is a pruning decision,
    # taken only when the user asks for sparsity (then the guard judges it on held-out data).
    channel_states = _channel_states(sites, stats) if settings.sparsity > 0 else {}

    # The pruned model's outputs are kept instead of its session, which goes before surgery runs
    # (when they take less memory than its weights; else it stays and runs again).
    reference = Outputs.instead_of(pruned, data, settings.batch_size)

    def measure(candidate: onnx.ModelProto) -> float:
        return compare(reference, candidate, data, settings.batch_size).rel_error

    tolerance = settings.merge_tolerance
    result = simplify(model, channel_states, measure=measure, tolerance=tolerance)
    record = SurgeryRecord(
        enabled=True,
        merge_tolerance=tolerance,
        rewrites=tuple(result.rewrites),
        dead_parameters_zeroed=result.dead_parameters_zeroed,
        rel_error=None,
        max_abs_error=None,
        reverted=False,
        revert_reason=None,
    )
    try:
        rewritten = Prepared(result.model, checked_split(result.model))
        check = compare(reference, rewritten, data, settings.batch_size, SURGERY_ATOL, SURGERY_RTOL)
    except (onnx.checker.ValidationError, EgpError) as exc:
        reason = f"graph surgery produced an invalid model ({exc})"
        log.error("%s; keeping the pruned model", reason)
        return pruned, replace(record, reverted=True, revert_reason=reason), {}
    record = replace(record, rel_error=check.rel_error, max_abs_error=check.max_abs_error)
    inexact = any(not r.exact and r.applied for r in result.rewrites)
    if inexact:
        failed = [o for o in check.outputs if not o.rel_error <= tolerance + SURGERY_CHECK]
    else:
        failed = [o for o in check.outputs if not o.allclose]
    if failed:
        worst = max(failed, key=lambda o: o.rel_error)
        reason = (
            f"graph surgery changed output {worst.name} by up to {worst.max_abs_error:.3g} "
            f"({worst.rel_error:.3g} relative) on the calibration data"
        )
        log.error("%s; keeping the pruned model", reason)
        return pruned, replace(record, reverted=True, revert_reason=reason), {}
    return rewritten, record, result.states


def _channel_states(sites: list[RectifierSite], stats: Statistics) -> dict[str, ChannelStates]:
    """Per activation node that surgery may remove, which channels are always ON / OFF.

    The slices of an activation after a Concat are put back together in channel order.
    """
    parts: dict[str, list[tuple[int, tuple[np.ndarray, np.ndarray]]]] = {}
    for site in sites:
        counts = stats.counts[site.name]
        if site.kind in REMOVABLE_KINDS and counts.on.size:
            start = site.channels[0] if site.channels else 0
            parts.setdefault(site.node, []).append((start, ent.constant_channels(counts.on, counts.total)))
    states = {}
    for node, slices in parts.items():
        slices.sort(key=lambda part: part[0])
        on = np.concatenate([part[1][0] for part in slices])
        off = np.concatenate([part[1][1] for part in slices])
        states[node] = ChannelStates(on, off)
    return states


def _weightless(model: onnx.ModelProto, known: Mapping[str, np.ndarray]) -> Prepared:
    """``model`` with its session, holding the model without its weights: only the session keeps them.

    ``known``: values of the model's initializers already read (see ``split_weights``).
    """
    stubbed, weights = split_weights(model, known=known)
    return Prepared(stubbed, (stubbed, weights))


def _strip_value_info(model: onnx.ModelProto, in_place: bool) -> onnx.ModelProto:
    """Drop the value_info our shape inference added, so the output stays as lean as the input.

    ``in_place`` for a model the run made itself (the loop's): no copy of its weights.
    """
    copy = model
    if not in_place:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
    del copy.graph.value_info[:]
    return copy
