"""The pipeline: load -> calibrate -> entropy -> budget/prune -> report.

``analyze`` and ``compress`` are the public API; the CLI is a thin layer over them. Neither
mutates the caller's model: ``compress`` returns a new model with its report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from egp_onnx import entropy as ent
from egp_onnx import prune
from egp_onnx.calibrate import Statistics, collect_statistics
from egp_onnx.data import CalibrationData, CalibrationDataReader, open_calibration
from egp_onnx.depth import depth, op_counts
from egp_onnx.errors import ConfigError, EgpError, NothingToPruneError
from egp_onnx.io import load_model, prepare_model
from egp_onnx.report import (
    AnalysisReport,
    CompressionReport,
    LayerRecord,
    ModelSummary,
    RectifierRecord,
    StepRecord,
    SurgeryRecord,
)
from egp_onnx.surgery import ChannelStates, simplify
from egp_onnx.topology import (
    RECTIFIER_OPS,
    RectifierSite,
    count_parameters,
    find_rectifiers,
    initializer_arrays,
    prunable_layers,
    replace_initializers,
)
from egp_onnx.verify import compare

log = logging.getLogger(__name__)

METHODS = ("egp", "magnitude")
MAX_STEPS = 200

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
    data: DataSource, model: onnx.ModelProto, mean: Sequence[float], std: Sequence[float]
) -> CalibrationData:
    if isinstance(data, CalibrationData):
        return data
    return open_calibration(data, model, mean=mean, std=std)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")


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


def analyze(
    model: ModelSource,
    calib: DataSource,
    *,
    batch_size: int = 32,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    progress: Progress | None = None,
) -> AnalysisReport:
    """Measure the entropy of every rectifier of ``model`` on the calibration data.

    Raises:
        EgpError: bad model, data or options (a one-line message).

    """
    _check_batch_size(batch_size)
    proto, source = _load(model)
    data = _open(calib, proto, mean, std)
    progress = progress or _Silent()
    sites = find_rectifiers(proto)
    progress.stage("calibrating")
    stats = collect_statistics(proto, sites, data, batch_size, progress.advance)
    return AnalysisReport(
        source=source,
        samples=stats.samples,
        layers=tuple(_site_record(s, stats) for s in sites),
    )


def _check_compress_options(sparsity: float, step: float, method: str, batch_size: int) -> None:
    _check_batch_size(batch_size)
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"--sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 < step <= 1.0:
        raise ConfigError(f"--step must be in (0, 1], got {step}")
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")


class _LayerSet:
    """The prunable layers, their sites and their current weights."""

    def __init__(self, model: onnx.ModelProto, sites: list[RectifierSite]) -> None:
        owned = prunable_layers(sites)
        self.sites = list(owned.values())
        self.weight_names = [s.owner.weight for s in self.sites if s.owner]
        arrays = initializer_arrays(model, self.weight_names)
        self.weights = [arrays[n] for n in self.weight_names]

    def nnz(self) -> np.ndarray:
        return np.array([np.count_nonzero(w) for w in self.weights], dtype=np.int64)

    def sizes(self) -> np.ndarray:
        return np.array([w.size for w in self.weights], dtype=np.int64)

    def entropies(self, stats: Statistics) -> np.ndarray:
        return np.array(
            [ent.layer_entropy(stats.counts[s.name].on, stats.counts[s.name].total) for s in self.sites]
        )

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return replace_initializers(model, dict(zip(self.weight_names, self.weights, strict=True)))


def _step_counts(
    layers: _LayerSet, stats: Statistics, method: str, step: float, needed: int
) -> tuple[np.ndarray, str]:
    """How many weights each layer loses in this step, and the rule that decided it."""
    nnz = layers.nnz()
    if method == "magnitude":
        return prune.global_magnitude_amounts(layers.weights, needed), "magnitude"
    entropy = layers.entropies(stats)
    participating = (entropy > 0) & (nnz > 0)
    if not participating.any():
        # Every layer with weights left has zero entropy: EGP has nothing to guide it. Reach the
        # requested sparsity by global magnitude, and say so in the report.
        log.warning("no layer with positive entropy left; finishing by global magnitude")
        return prune.global_magnitude_amounts(layers.weights, needed), "magnitude-fallback"
    budget = min(max(1, int(np.floor(step * nnz[participating].sum()))), needed)
    mean_abs = np.array([prune.mean_abs_nonzero(w) for w in layers.weights])
    amounts = prune.egp_allocation(entropy, mean_abs, nnz, budget)
    return prune.integer_amounts(amounts, nnz, budget), "egp"


def compress(
    model: ModelSource,
    calib: DataSource,
    *,
    sparsity: float = 0.9,
    step: float = 0.5,
    method: str = "egp",
    batch_size: int = 32,
    seed: int = 0,
    surgery: bool = True,
    merge_tolerance: float = 0.0,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    progress: Progress | None = None,
) -> CompressionResult:
    """Prune ``model`` to ``sparsity`` of its prunable weights with Entropy-Guided Pruning.

    Each step measures the rectifiers' entropy on the calibration data, removes ``step`` of the
    remaining weights of the positive-entropy layers where the EGP budget puts them, and
    measures again. ``method="magnitude"`` spends the same total budget by global magnitude.

    Args:
        model: path to an ONNX file or a ModelProto (not modified).
        calib: calibration data (see :func:`egp_onnx.data.open_calibration`).
        sparsity: fraction of the prunable weights to zero, in [0, 1).
        step: fraction of the remaining weights removed per EGP step, in (0, 1].
        method: ``egp`` or ``magnitude``.
        batch_size: samples per onnxruntime call.
        seed: order among weights of equal magnitude.
        surgery: reduce depth after pruning (fold, bypass, merge, delete layers).
        merge_tolerance: largest relative output error, measured on the calibration data, at
            which a merge that is not exact is applied; 0 applies exact rewrites only.
        mean: image normalisation (image folders only).
        std: image normalisation (image folders only).
        progress: receives progress events.

    Raises:
        EgpError: bad model, data or options; NothingToPruneError if no layer can be pruned.

    """
    _check_compress_options(sparsity, step, method, batch_size)
    if merge_tolerance < 0:
        raise ConfigError(f"--merge-tolerance must be at least 0, got {merge_tolerance}")
    proto, source = _load(model)
    data = _open(calib, proto, mean, std)
    progress = progress or _Silent()
    sites = find_rectifiers(proto)
    layers = _LayerSet(proto, sites)
    if not layers.sites:
        raise NothingToPruneError(
            f"{source}: nothing to prune: no Conv/Gemm/MatMul layer with an initializer weight feeds a ReLU"
        )
    rng = np.random.default_rng(seed)
    total = int(layers.sizes().sum())
    target_zeros = int(round(sparsity * total))
    progress.stage("calibrating the original model")
    stats = first_stats = collect_statistics(proto, sites, data, batch_size, progress.advance)
    nnz_before = layers.nnz()
    params_before, nonzero_params_before = count_parameters(proto)
    current = proto
    steps: list[StepRecord] = []
    while total - int(layers.nnz().sum()) < target_zeros and len(steps) < MAX_STEPS:
        needed = target_zeros - (total - int(layers.nnz().sum()))
        counts, rule = _step_counts(layers, stats, method, step, needed)
        if counts.sum() == 0:
            break
        layers.weights = [
            prune.prune_smallest(w, int(c), rng) for w, c in zip(layers.weights, counts, strict=True)
        ]
        current = layers.apply(proto)
        progress.stage(f"step {len(steps) + 1}: calibrating at sparsity {1 - layers.nnz().sum() / total:.3f}")
        stats = collect_statistics(current, sites, data, batch_size, progress.advance)
        entropies = layers.entropies(stats)
        steps.append(
            StepRecord(
                step=len(steps) + 1,
                method=rule,
                removed=int(counts.sum()),
                sparsity=1.0 - float(layers.nnz().sum()) / total,
                zero_entropy_layers=int((entropies == 0).sum()),
                emptied_layers=int((layers.nnz() == 0).sum()),
            )
        )
    pruned = _strip_value_info(current)
    final, surgery_record = pruned, SurgeryRecord(False, merge_tolerance, (), 0, None, None, False)
    states: dict[str, str] = {}
    if surgery:
        progress.stage("reducing depth")
        final, surgery_record, states = _reduce_depth(pruned, sites, stats, data, batch_size, merge_tolerance)
    report = _compression_report(
        source,
        layers,
        first_stats,
        stats,
        nnz_before,
        steps,
        settings={
            "sparsity": sparsity,
            "step": step,
            "method": method,
            "batch_size": batch_size,
            "seed": seed,
            "surgery": surgery,
            "merge_tolerance": merge_tolerance,
        },
        params=(params_before, nonzero_params_before, *count_parameters(final)),
        structure=(proto, final),
        surgery=surgery_record,
        states=states,
    )
    return CompressionResult(model=final, report=report)


#: A rewritten model whose output differs from the pruned one by more than this (relative, on the
#: calibration data, on top of the merge tolerance) is a defect: the pruned model is kept instead.
SURGERY_CHECK = 1e-4


def _reduce_depth(
    pruned: onnx.ModelProto,
    sites: list[RectifierSite],
    stats: Statistics,
    data: CalibrationData,
    batch_size: int,
    merge_tolerance: float,
) -> tuple[onnx.ModelProto, SurgeryRecord, dict[str, str]]:
    """Run graph surgery on the pruned model and check it against the pruned model."""
    channel_states = {}
    for site in sites:
        counts = stats.counts[site.name]
        if site.op_type in RECTIFIER_OPS and counts.on.size:
            channel_states[site.name] = ChannelStates(*ent.constant_channels(counts.on, counts.total))

    def measure(candidate: onnx.ModelProto) -> float:
        return compare(pruned, candidate, data, batch_size).rel_error

    result = simplify(pruned, channel_states, measure=measure, tolerance=merge_tolerance)
    try:
        onnx.checker.check_model(result.model)
        check = compare(pruned, result.model, data, batch_size)
    except (onnx.checker.ValidationError, EgpError) as exc:
        log.error("graph surgery produced an invalid model (%s); keeping the pruned model", exc)
        return pruned, SurgeryRecord(True, merge_tolerance, tuple(result.rewrites), 0, None, None, True), {}
    reverted = not check.rel_error <= merge_tolerance + SURGERY_CHECK
    if reverted:
        log.error(
            "graph surgery changed the outputs by %.3g (relative) on the calibration data; "
            "keeping the pruned model",
            check.rel_error,
        )
    record = SurgeryRecord(
        enabled=True,
        merge_tolerance=merge_tolerance,
        rewrites=tuple(result.rewrites),
        dead_parameters_zeroed=result.dead_weights_zeroed,
        rel_error=check.rel_error,
        max_abs_error=check.max_abs_error,
        reverted=reverted,
    )
    return (pruned, record, {}) if reverted else (result.model, record, result.states)


def _strip_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the value_info our shape inference added, so the output stays as lean as the input."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    return copy


def _layer_state(weights: int, nonzero: int, entropy: float, channels: int, always_off: int) -> str:
    if nonzero == 0 or always_off == channels:
        return "constant"
    if entropy == 0.0:
        return "identity"
    return "pruned" if nonzero < weights else "kept"


def _compression_report(
    source: str,
    layers: _LayerSet,
    before: Statistics,
    after: Statistics,
    nnz_before: np.ndarray,
    steps: list[StepRecord],
    settings: dict[str, object],
    params: tuple[int, int, int, int],
    structure: tuple[onnx.ModelProto, onnx.ModelProto],
    surgery: SurgeryRecord,
    states: dict[str, str],
) -> CompressionReport:
    h_before = layers.entropies(before)
    h_after = layers.entropies(after)
    nnz = layers.nnz()
    sizes = layers.sizes()
    records = []
    for i, site in enumerate(layers.sites):
        assert site.owner is not None  # _LayerSet keeps owned sites only
        counts = after.counts[site.name]
        on, off = ent.constant_channels(counts.on, counts.total)
        records.append(
            LayerRecord(
                name=site.owner.name,
                op_type=site.owner.op_type,
                rectifier=site.name,
                channels=int(counts.on.size),
                entropy_before=float(h_before[i]),
                entropy=float(h_after[i]),
                always_on=int(on.sum()),
                always_off=int(off.sum()),
                weights=int(sizes[i]),
                nonzero_before=int(nnz_before[i]),
                nonzero=int(nnz[i]),
                sparsity=1.0 - float(nnz[i]) / float(sizes[i]),
                state=states.get(site.owner.name)
                or _layer_state(
                    int(sizes[i]), int(nnz[i]), float(h_after[i]), int(counts.on.size), int(off.sum())
                ),
            )
        )
    total = int(sizes.sum())
    zeroed = total - int(nnz.sum())
    depth_before, depth_after = depth(structure[0]), depth(structure[1])
    summary = ModelSummary(
        params_before=params[0],
        nonzero_params_before=params[1],
        params_after=params[2],
        nonzero_params_after=params[3],
        prunable_layers=len(records),
        prunable_weights=total,
        prunable_zeroed=zeroed,
        sparsity=zeroed / total,
        zero_entropy_layers_before=int((h_before == 0).sum()),
        zero_entropy_layers_after=int((h_after == 0).sum()),
        depth_before=depth_before.layers,
        depth_after=depth_after.layers,
        nonlinear_depth_before=depth_before.nonlinear,
        nonlinear_depth_after=depth_after.nonlinear,
        nodes_before=len(structure[0].graph.node),
        nodes_after=len(structure[1].graph.node),
        op_counts_before=op_counts(structure[0]),
        op_counts_after=op_counts(structure[1]),
    )
    return CompressionReport(
        source=source,
        settings=settings,
        samples=after.samples,
        layers=tuple(records),
        steps=tuple(steps),
        model=summary,
        surgery=surgery,
    )
