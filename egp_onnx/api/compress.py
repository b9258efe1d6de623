"""The pipeline: load -> calibrate -> entropy -> budget/prune -> surgery -> verify -> report.

``compress`` composes the stages; it never mutates the caller's model: it returns a new model
with its report. ``analyze`` and ``statistics`` run the first stages alone (:mod:`.analyze`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import onnx

from egp_onnx.api.analyze import (
    DataSource,
    ModelSource,
    Progress,
    Silent,
    analyze,
    statistics,
    stats_files,
)
from egp_onnx.api.channels import remove_channels
from egp_onnx.api.quantize import quantize_stage, shipped_form
from egp_onnx.api.stages import Inputs, channel_states, open_inputs, run_options, strip_value_info, weightless
from egp_onnx.api.summary import layer_records, model_summary
from egp_onnx.calibrate.collect import collect_statistics
from egp_onnx.config import METHODS, DataConfig, Settings
from egp_onnx.entropy import Statistics
from egp_onnx.errors import EgpError, GuardError
from egp_onnx.graph.carry import carry_model_fields
from egp_onnx.graph.rectifiers import RectifierSite, find_rectifiers
from egp_onnx.graph.structure import depth
from egp_onnx.graph.weights import initializer_counts, shape_skeleton
from egp_onnx.load.calibration import CalibrationData
from egp_onnx.load.model import checked_split
from egp_onnx.prune.finetune import Finetune, start_finetune
from egp_onnx.prune.limits import sparsity_limits
from egp_onnx.prune.loop import LayerSet, LoopContext, LoopOutcome, run_loop
from egp_onnx.report.records import (
    ChannelsRecord,
    CompressionReport,
    Cost,
    CostComparison,
    Fidelity,
    GuardFailureReport,
    SurgeryRecord,
)
from egp_onnx.runtime.cluster import Cluster, cluster_or_none
from egp_onnx.runtime.handle import ModelHandle, StoredOutputs
from egp_onnx.runtime.memory import trim
from egp_onnx.surgery import simplify
from egp_onnx.verify.cost import model_cost
from egp_onnx.verify.fidelity import Reference, compare
from egp_onnx.verify.guard import (
    SURGERY_ATOL,
    SURGERY_CHECK,
    SURGERY_RTOL,
    Guard,
    default_thresholds,
    surgery_failures,
)
from egp_onnx.verify.latency import common_feed, compare_latency, latency_feeds, one_sample, sample_shapes
from egp_onnx.verify.sensitivity import caps_wanted, layer_blame, sensitivity_caps

log = logging.getLogger(__name__)

__all__ = ["METHODS", "CompressionResult", "Progress", "Settings", "analyze", "compress", "statistics"]


@dataclass(frozen=True)
class CompressionResult:
    """The compressed model and the report that describes it."""

    model: onnx.ModelProto
    report: CompressionReport


def compress(
    model: ModelSource,
    calib: DataSource,
    settings: Settings | None = None,
    *,
    eval_data: DataSource | None = None,
    stats: Sequence[str | os.PathLike[str]] = (),
    finetune: Finetune | None = None,
    data: DataConfig | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> CompressionResult:
    """Prune ``model`` toward ``sparsity`` of its prunable weights with Entropy-Guided Pruning.

    Each step measures the rectifiers' entropy on the calibration data, removes ``step`` of the
    remaining weights of the positive-entropy layers where the EGP budget puts them, refits the
    layers by least squares so they reproduce the original (``reconstruct``), and measures
    again. ``method="magnitude"`` spends the same total budget by global magnitude. Graph surgery
    then makes the pruned model shallower. Fidelity against the original is measured on
    ``eval_data`` (or a ``holdout`` split of the calibration data, automatic by default); the
    guard (on by default, every output by its kind's rule: estimated unseen top-1 agreement
    >= 0.99 for classifier and sequence outputs, relative error <= 0.05 for the others, see
    :mod:`egp_onnx.verify.guard`) rolls back a step that breaks it, bisects toward the largest
    step it accepts, and stops there: the default target is "as far as the guard allows", up
    to ``sparsity``.

    Options are the fields of :class:`~egp_onnx.config.Settings` (described there), from
    ``settings`` and then any given as keywords: ``compress(m, c, sparsity=0.5, guard=False)``;
    and those of :class:`~egp_onnx.config.DataConfig` (``data``, or ``mean``/``std``/``workers``/
    ``scheduler``: the statistics passes on a Dask cluster, with the same counts).

    Args:
        model: path to an ONNX file or a ModelProto (not modified).
        calib: calibration data (see :func:`egp_onnx.load.calibration.open_calibration`).
        settings: the options; None: the defaults.
        eval_data: held-out data in any calibration format; ``labels`` give accuracy.
        stats: statistics files of the original model (`egp-onnx stats`) used for the first step
            instead of a calibration pass; later steps measure the pruned model on ``calib``.
        finetune: called after every pruning step with the pruned model and its masks (per
            prunable initializer, True where a weight is kept); returns the retrained model or new
            tensor values (see :mod:`egp_onnx.integrations.torch` for a ready PyTorch one). Masks are applied
            again to what it returns.
        data: how calibration data is read (``mean``, ``std``: image normalisation, image folders
            only; ``workers``: threads that load calibration shards ahead).
        progress: receives progress events.
        overrides: options that replace those of ``settings`` or ``data``.

    Raises:
        EgpError: bad model, data or options (ConfigError for an unknown option);
            NothingToPruneError if no layer can be pruned; GuardError if even the first step
            breaks the guard.

    """
    settings, options = run_options(settings, data, finetune, eval_data, overrides)
    # The cluster first: a scheduler that cannot be reached is an error before any work.
    with cluster_or_none(options.scheduler) as cluster:
        return _compress(model, calib, eval_data, stats, finetune, settings, options, progress, cluster)


def _compress(
    model: ModelSource,
    calib: DataSource,
    eval_data: DataSource | None,
    stats: Sequence[str | os.PathLike[str]],
    finetune: Finetune | None,
    settings: Settings,
    options: DataConfig,
    progress: Progress | None,
    cluster: Cluster | None,
) -> CompressionResult:
    """:func:`compress` once its options are checked (statistics passes on ``cluster`` if given)."""
    progress = progress or Silent()
    proto, inputs = open_inputs(model, calib, eval_data, settings, options)
    # local:N workers start in the background: the original's pass runs here if they are not up
    # yet (the same cores, the same counts), and the loop's first refit waits for them
    up = cluster if cluster is not None and cluster.ready else None
    base = _baseline(proto, inputs, stats, settings, progress, up)
    settings = default_thresholds(settings, base.reference)
    settings = replace(settings, sensitivity=caps_wanted(settings.sensitivity, base.reference.samples))
    # with --quantize the stages judge their candidates quantized too, so INT8 keeps its share
    shipped = shipped_form(proto, inputs, base.reference, settings)
    # with no thresholds set (--no-guard) it only measures
    guard = Guard(base.reference, settings, inputs.layers.held, shipped, cluster)
    if finetune is not None:
        start_finetune(finetune, proto)
    channels = None
    if settings.channels:
        proto, inputs, base, guard, channels = _channel_stage(
            proto, inputs, base, guard, settings, progress, finetune
        )
    caps = _measured_caps(proto, inputs, base.reference, settings, progress)
    ctx = LoopContext(
        proto, inputs.sites, inputs.layers, inputs.limits, inputs.data, settings, guard,
        progress.stage, progress.advance, finetune,
        cluster=cluster, start_passes=channels is not None and channels.removed > 0, caps=caps,
    )  # fmt: skip
    try:
        outcome = run_loop(ctx, base.first_stats)
    except GuardError as exc:
        exc.report = _failure_report(exc, inputs, base.reference, settings, progress)
        raise
    pruned = strip_value_info(outcome.model, in_place=outcome.model is not proto)
    inputs.layers.release()  # the loop's weights are in the pruned model (and the guard's session of it)
    # From here on the original's graph is enough: its weights go (kept by nothing else unless the
    # loop's result is the original itself; its session, when kept, holds its own copy of them).
    outline = shape_skeleton(proto)
    del proto, ctx
    trim()  # what the loop freed leaves the process before surgery builds the rewritten model's session
    stage = _surgery_stage(pruned, guard.handle(pruned), inputs, outcome.stats, guard, settings, progress)
    quantized = quantize_stage(stage.final, stage.run, inputs, guard, settings, progress)
    float_depth = depth(stage.final)
    if quantized is not None and quantized.record.applied:
        stage = replace(stage, final=quantized.model, run=quantized.run, fidelity=quantized.fidelity)
    progress.stage("measuring the result")
    # surgery's exporter drops what the model carries besides its graph (metadata a reader needs);
    # put back before the report measures the file
    carry_model_fields(outline, stage.final)
    report = _report(inputs, base, outcome, stage, outline, settings)
    report = replace(report, channels=channels)
    if quantized is not None:
        # QDQ drops each ReLU into the uint8 QuantizeLinear after it (zero point 0 clamps at 0):
        # the depth stays the float graph's, the op counts are the written model's
        summary = replace(
            report.model, depth_after=float_depth.layers, nonlinear_depth_after=float_depth.nonlinear
        )
        report = replace(report, model=summary, quantization=quantized.record)
    return CompressionResult(model=stage.final, report=report)


def _channel_stage(
    proto: onnx.ModelProto,
    inputs: Inputs,
    base: _Baseline,
    guard: Guard,
    settings: Settings,
    progress: Progress,
    finetune: Finetune | None,
) -> tuple[onnx.ModelProto, Inputs, _Baseline, Guard, ChannelsRecord]:
    """Remove whole channels first; the loop then starts from the narrowed model as its dense one.

    Channels go before weights: their refit and their price need the dense consumers' equations
    (a consumer already sparse would be refit on its support only), and weight pruning then works
    on, and refits against, the model that will be written. The guard keeps judging against the
    original's outputs, so the two stages together stay within it. With ``finetune``, each
    candidate is retrained before the guard judges it, as each weight step is.
    """
    progress.stage("removing channels")
    result = remove_channels(proto, inputs.data, settings, guard, base.shapes, progress.stage, finetune)
    if result.model is proto:
        return proto, inputs, base, guard, result.record
    narrow = result.model
    sites = find_rectifiers(narrow)
    layers = LayerSet(narrow, sites)
    limits = sparsity_limits(narrow, layers.weight_names, settings.layer_cap)
    inputs = replace(inputs, sites=sites, layers=layers, limits=limits)
    progress.stage("calibrating the narrowed model")
    held = layers.held(narrow)
    batch_size, cluster = settings.batch_size, guard.cluster
    first = collect_statistics(narrow, sites, inputs.data, batch_size, progress.advance, held, cluster)
    base = replace(base, first_stats=first, nnz_before=layers.nnz())
    guard = Guard(base.reference, settings, layers.held, guard.shipped, cluster)
    return narrow, inputs, base, guard, result.record


def _measured_caps(
    proto: onnx.ModelProto, inputs: Inputs, reference: Reference, settings: Settings, progress: Progress
) -> dict[str, float] | None:
    """The graph's layer limits, lowered where a layer pruned alone takes too much of the guard.

    None without a guard, sparsity or ``settings.sensitivity``: the loop has the graph's limits only.
    """
    limits = dict(inputs.limits)
    if not (settings.sensitivity and settings.guarded and settings.sparsity > 0):
        return None
    progress.stage("measuring each layer's sensitivity")
    measured = sensitivity_caps(
        proto,
        inputs.layers.held(proto),
        limits,
        reference,
        settings.min_agreement,
        settings.max_rel_error,
        min_iou=settings.min_iou,
    )
    for layer in measured:
        limits[layer.weight] = min(limits[layer.weight], layer.cap)
    return limits


def _failure_report(
    exc: GuardError, inputs: Inputs, reference: Reference, settings: Settings, progress: Progress
) -> GuardFailureReport | None:
    """The report of a run whose first step never passed the guard, with the layers that hurt most."""
    failure = exc.failure
    if failure is None:
        return None
    progress.stage("measuring which layers broke the guard")
    layers = inputs.layers  # rolled back: the weights before the failed step
    accepted = dict(zip(layers.weight_names, layers.weights, strict=True))
    blamed = layer_blame(
        failure.candidate,
        accepted,
        failure.removed,
        reference,
        settings.min_agreement,
        settings.max_rel_error,
        min_iou=settings.min_iou,
    )
    return GuardFailureReport(
        source=inputs.source,
        settings=asdict(settings),
        error=str(exc),
        steps=failure.steps,
        layers=tuple(blamed),
    )


@dataclass(frozen=True)
class _Baseline:
    """The original model's figures that every later measurement compares against."""

    original: ModelHandle | None  # what the latency is compared against (None: no latency measured)
    reference: Reference
    first_stats: Statistics
    nnz_before: np.ndarray
    feed: dict[str, np.ndarray]  # the first held-out batch of the shape most samples have
    shapes: dict[str, tuple[int, ...]]  # its inputs' shapes at batch size 1: MACs are counted there
    cost_before: Cost


def _baseline(
    proto: onnx.ModelProto,
    inputs: Inputs,
    stats: Sequence[str | os.PathLike[str]],
    settings: Settings,
    progress: Progress,
    cluster: Cluster | None = None,
) -> _Baseline:
    """The original's reference outputs and first statistics, computed side by side, and its cost."""
    layers, batch_size = inputs.layers, settings.batch_size
    # With latency on, the original's session that computes the reference outputs is kept for the
    # latency measurement (it has already run the timed batch size); it comes without the model's
    # weights, which after the loop only the session holds.
    original = weightless(proto, layers.held(proto)) if settings.latency else None
    runs = original or ModelHandle(proto)  # without latency its session goes with the reference run
    with ThreadPoolExecutor(1, thread_name_prefix="egp-reference") as pool:
        # The reference outputs are computed while the statistics pass runs, which leaves cores
        # idle on a few batches. One data source is never read from two threads.
        held = inputs.held
        unseen, threshold = settings.eval_unseen, settings.map_threshold
        pending = None
        if held is not inputs.data:
            pending = pool.submit(Reference, runs, held, batch_size, unseen, threshold)
        if stats:
            first_stats = stats_files(stats, proto, inputs.sites)
        else:
            progress.stage("calibrating the original model")
            first_stats = collect_statistics(
                proto, inputs.sites, inputs.data, batch_size, progress.advance, layers.held(proto), cluster
            )
        progress.stage(f"running the original model on the {inputs.held_name} data")
        reference = (
            pending.result() if pending is not None else Reference(runs, held, batch_size, unseen, threshold)
        )
    del runs
    nnz_before = layers.nnz()
    # Latency and MACs at one stated shape: the one most held-out samples have.
    feed = common_feed(batch_feed for batch_feed, _, _ in reference.batches)
    shapes = sample_shapes(feed)
    # the original's cost is taken while its weights are at hand (after the loop they are gone)
    held_counts = original.counts if original is not None else None
    counts = held_counts or initializer_counts(proto, layers.held(proto))
    cost_before = model_cost(proto, shapes, counts, one_sample(feed))
    return _Baseline(original, reference, first_stats, nnz_before, feed, shapes, cost_before)


@dataclass(frozen=True)
class _Surgery:
    """What graph surgery leaves: the model to write, what measures it, the record, the states."""

    final: onnx.ModelProto
    run: ModelHandle  # runs ``final``
    record: SurgeryRecord
    states: dict[str, str]
    fidelity: Fidelity | None  # measured by the guard, when it checked the rewritten model


def _surgery_stage(
    pruned: onnx.ModelProto,
    run: ModelHandle,
    inputs: Inputs,
    stats: Statistics,
    guard: Guard,
    settings: Settings,
    progress: Progress,
) -> _Surgery:
    """Reduce the pruned model's depth, check the result with the guard, and revert if it fails.

    ``run`` runs ``pruned``, with the guard's session of it when it has one.
    """
    if not settings.surgery:
        off = SurgeryRecord(
            enabled=False,
            merge_tolerance=settings.merge_tolerance,
            rewrites=(),
            dead_parameters_zeroed=0,
            rel_error=None,
            max_abs_error=None,
            reverted=False,
            revert_reason=None,
        )
        return _Surgery(pruned, run, off, {}, None)
    progress.stage("reducing depth")
    pruned_run = run
    run, record, states = _reduce_depth(run, inputs.sites, stats, inputs.data, settings)
    final = run.model
    if final is pruned:
        return _Surgery(final, run, record, states, None)
    fidelity, problems = guard.check(run)
    if problems:
        reason = f"the rewritten model fails the guard on the {inputs.held_name} data: {'; '.join(problems)}"
        log.warning("%s; keeping the pruned model", reason)
        return _Surgery(pruned, pruned_run, replace(record, reverted=True, revert_reason=reason), {}, None)
    return _Surgery(final, run, record, states, fidelity)


def _report(
    inputs: Inputs,
    base: _Baseline,
    outcome: LoopOutcome,
    stage: _Surgery,
    outline: onnx.ModelProto,
    settings: Settings,
) -> CompressionReport:
    """Measure the model to write (fidelity, cost, latency) and gather the run's records."""
    fidelity = stage.fidelity if stage.fidelity is not None else base.reference.evaluate(stage.run)
    # the weights that the session already holds are counted without reading the protobuf again
    counts = stage.run.counts or None  # taken when its session was built
    cost_after = model_cost(stage.final, base.shapes, counts, one_sample(base.feed))
    timing = None
    if base.original is not None:
        timing = compare_latency(base.original, stage.run, latency_feeds(outline, base.feed))
    return CompressionReport(
        source=inputs.source,
        settings=asdict(settings),
        samples=outcome.stats.samples,
        layers=layer_records(inputs.layers, base.first_stats, outcome.stats, base.nnz_before, stage.states),
        steps=outcome.steps,
        stop=outcome.stop,
        model=model_summary(
            inputs.layers, base.first_stats, outcome.stats, outline, stage.final, base.cost_before, cost_after
        ),
        surgery=stage.record,
        fidelity=replace(fidelity, data=inputs.held_name),
        cost=CostComparison(base.cost_before, cost_after, base.shapes),
        timing=timing,
    )


def _reduce_depth(
    pruned: ModelHandle,
    sites: list[RectifierSite],
    stats: Statistics,
    data: CalibrationData,
    settings: Settings,
) -> tuple[ModelHandle, SurgeryRecord, dict[str, str]]:
    """Run graph surgery on the pruned model and check it against the pruned model.

    Returns:
        ``pruned`` (surgery reverted) or the rewritten model with the session that checked it,
        for the measurements that follow; the record; the layers' states.

    """
    model = pruned.model
    # Always-ON / always-OFF channels are read off a sample: removing them is a pruning decision,
    # taken only when the user asks for sparsity (then the guard judges it on held-out data).
    on_off = channel_states(sites, stats) if settings.sparsity > 0 else {}

    # The pruned model's outputs are kept instead of its session, which goes before surgery runs
    # (when they take less memory than its weights; else it stays and runs again).
    reference = StoredOutputs.instead_of(pruned, data, settings.batch_size)

    def measure(candidate: onnx.ModelProto) -> float:
        return compare(reference, candidate, data, settings.batch_size).rel_error

    tolerance = settings.merge_tolerance
    result = simplify(model, on_off, measure=measure, tolerance=tolerance)
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
        rewritten = ModelHandle(result.model, checked_split(result.model))
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
        failed = surgery_failures(check)
    if failed:
        worst = max(failed, key=lambda o: o.rel_error)
        reason = (
            f"graph surgery changed output {worst.name} by up to {worst.max_abs_error:.3g} "
            f"({worst.rel_error:.3g} relative) on the calibration data"
        )
        log.error("%s; keeping the pruned model", reason)
        return pruned, replace(record, reverted=True, revert_reason=reason), {}
    return rewritten, record, result.states
