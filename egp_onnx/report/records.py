"""Typed records of an analysis or compression run, their JSON form and their text tables."""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, dataclass
from typing import Any

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class RectifierRecord:
    """Statistics of one activation node over the calibration set."""

    name: str | None  # owning layer, None when no Conv/Gemm/MatMul owns the activation
    op_type: str | None  # owning layer's op type
    rectifier: str  # activation node name
    activation: str  # activation op type (Relu, Clip, ...)
    prunable: bool  # True when this activation guides pruning (a ReLU with an owner)
    channels: int
    always_on: int
    always_off: int
    entropy: float
    on_fraction: float  # mean ON fraction over channels


@dataclass(frozen=True)
class AnalysisReport:
    """What `egp-onnx analyze` finds."""

    source: str  # the model analysed
    samples: int
    layers: tuple[RectifierRecord, ...]
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return _clean(asdict(self))


@dataclass(frozen=True)
class LayerRecord:
    """One prunable layer before and after compression."""

    name: str
    op_type: str
    rectifier: str
    channels: int
    entropy_before: float
    entropy: float  # after compression
    always_on: int  # after compression
    always_off: int
    weights: int
    nonzero_before: int
    nonzero: int
    sparsity: float
    state: str  # kept | pruned | identity | constant | merged | removed


@dataclass(frozen=True)
class LayerFit:
    """Reconstruction of one layer in one step: relative error on the calibration data before and after."""

    name: str
    rows: int  # rows of its normal equations (samples x positions used)
    columns: int  # unknowns per output channel, the bias included
    error_before: float | None  # ||A w - y||^2 / ||y||^2 with the pruned, not yet refit weights
    error_after: float | None  # the same after the refit
    status: str  # refit, or why not


@dataclass(frozen=True)
class StepRecord:
    """One pruning step of the loop."""

    step: int
    method: str  # egp | magnitude | magnitude-fallback
    removed: int
    sparsity: float  # of the prunable weights after the step
    accepted: bool  # False: the guard rejected the step and it was rolled back
    top1_agreement: float | None  # against the original, when fidelity is measured
    rel_error: float | None
    zero_entropy_layers: int | None  # after the step (None for a rejected step)
    emptied_layers: int  # layers with no non-zero weight after the step
    finetuned: bool = False  # the finetune callback retrained the step's model
    reconstructed: tuple[LayerFit, ...] = ()  # per-layer least-squares refits of this step


@dataclass(frozen=True)
class Rewrite:
    """One graph rewrite that surgery applied or declined."""

    # the name of a rewrite (or of its step) in surgery/registry.py: fold_bn | zero_off_channels |
    # remove_rectifier | fold_constant | merge | fold_residual
    kind: str
    nodes: tuple[str, ...]
    exact: bool  # exact by algebra, or on the calibration data for statistics-based rewrites
    applied: bool
    error: float | None = None  # measured relative output error, for inexact merges
    detail: str = ""


@dataclass(frozen=True)
class SurgeryRecord:
    """What depth reduction did, and its check against the pruned model on the calibration data."""

    enabled: bool
    merge_tolerance: float
    rewrites: tuple[Rewrite, ...]
    dead_parameters_zeroed: int
    rel_error: float | None  # pruned model vs rewritten model, calibration data
    max_abs_error: float | None
    reverted: bool  # True when a check failed and the un-rewritten (pruned) model was kept
    revert_reason: str | None


@dataclass(frozen=True)
class OutputFidelity:
    """Differences on one graph output, over all samples."""

    name: str
    rel_error: float  # ||y' - y||_2 / ||y||_2
    max_abs_error: float
    allclose: bool  # |y' - y| <= atol + rtol |y| everywhere (Polygraphy's test)


@dataclass(frozen=True)
class Fidelity:
    """How closely a candidate reproduces a reference."""

    top1_agreement: float | None  # first output of shape (N, classes); None otherwise
    rel_error: float  # the largest rel_error over the outputs
    max_abs_error: float
    accuracy_before: float | None  # when the data has labels
    accuracy_after: float | None
    samples: int
    outputs: tuple[OutputFidelity, ...]
    data: str = ""  # eval | holdout | calibration: where the samples came from


@dataclass(frozen=True)
class Cost:
    """What a model costs per sample."""

    params: int
    nonzero_params: int
    macs: int | None  # multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul, per sample
    nonzero_macs: int | None  # the same, counting only non-zero weights
    file_bytes: int


@dataclass(frozen=True)
class CostComparison:
    """The original's and the compressed model's costs."""

    before: Cost
    after: Cost


@dataclass(frozen=True)
class StopRecord:
    """Why the pruning loop ended."""

    reason: str  # target | guard | no-weights-left | max-steps
    step: int  # the last accepted step (0: none)
    detail: str


@dataclass(frozen=True)
class LatencyRecord:
    """Latency of the original and the compressed model at one batch size, measured interleaved."""

    batch_size: int
    runs: int  # timed runs of each model (after the warm-up)
    median_ms_before: float
    iqr_ms_before: float  # interquartile range of the runs: the spread of the measurement
    median_ms_after: float
    iqr_ms_after: float
    speedup: float  # median_ms_before / median_ms_after


@dataclass(frozen=True)
class Timing:
    """onnxruntime CPU latency before and after (machine dependent, not byte-reproducible).

    Both models run in sessions with the same options (graph optimisation ``ORT_ENABLE_ALL``,
    default threads), so a speed-up is over what onnxruntime already does. Runs alternate between
    the two models after a warm-up, until ``max_runs`` runs or ``budget_s`` seconds per batch size.
    """

    optimization: str  # onnxruntime graph optimisation level of both sessions
    warmup: int  # untimed runs of each model per batch size
    budget_s: float
    max_runs: int
    batches: tuple[LatencyRecord, ...]  # batch 1 (when the model allows it) and the calibration batch


@dataclass(frozen=True)
class ModelSummary:
    """Whole-model figures."""

    params_before: int
    params_after: int
    nonzero_params_before: int
    nonzero_params_after: int
    prunable_layers: int
    prunable_weights: int
    prunable_zeroed: int
    sparsity: float  # prunable_zeroed / prunable_weights
    zero_entropy_layers_before: int
    zero_entropy_layers_after: int
    depth_before: int  # Conv/Gemm/MatMul on the longest input-to-output path
    depth_after: int
    nonlinear_depth_before: int  # activations on that path
    nonlinear_depth_after: int
    nodes_before: int
    nodes_after: int
    op_counts_before: dict[str, int]
    op_counts_after: dict[str, int]


@dataclass(frozen=True)
class CompressionReport:
    """What `egp-onnx compress` did, layer by layer and step by step."""

    source: str  # the input model
    settings: dict[str, Any]
    samples: int  # calibration samples
    layers: tuple[LayerRecord, ...]
    steps: tuple[StepRecord, ...]
    stop: StopRecord
    model: ModelSummary
    surgery: SurgeryRecord
    fidelity: Fidelity  # the compressed model against the original
    cost: CostComparison
    timing: Timing | None  # None with --no-latency
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return _clean(asdict(self))


def _clean(value: Any) -> Any:
    """Round floats for stable JSON and turn NaN into None."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 8)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_json(report: AnalysisReport | CompressionReport) -> str:
    """Deterministic JSON text: sorted keys, fixed indentation."""
    return json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n"


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain text table with right-aligned numbers."""
    text = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in text)
    return "\n".join(out)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def analysis_table(report: AnalysisReport) -> str:
    """One row per activation."""
    rows = [
        [
            r.rectifier,
            r.activation,
            r.name,
            r.op_type,
            r.channels,
            r.always_on,
            r.always_off,
            r.on_fraction,
            r.entropy,
            "yes" if r.prunable else "no",
        ]
        for r in report.layers
    ]
    headers = ["rectifier", "act", "layer", "op", "ch", "on", "off", "on_frac", "entropy", "prunable"]
    return format_table(headers, rows)


def compression_table(report: CompressionReport) -> str:
    """One row per prunable layer."""
    rows = [
        [
            r.name,
            r.op_type,
            r.weights,
            r.nonzero,
            r.sparsity,
            r.entropy_before,
            r.entropy,
            r.always_on,
            r.always_off,
            r.state,
        ]
        for r in report.layers
    ]
    headers = ["layer", "op", "weights", "nonzero", "sparsity", "H_before", "H_after", "on", "off", "state"]
    return format_table(headers, rows)


def steps_table(report: CompressionReport) -> str:
    """One row per loop step: what it pruned, how the refit went, what the guard said."""
    rows = []
    for step in report.steps:
        refit = [f for f in step.reconstructed if f.error_after is not None and f.error_before is not None]
        # a layer left without weights (bias only) keeps an error of about 1: not informative
        weighted = [f for f in refit if f.status == "refit"]
        worst = max(weighted, key=lambda f: f.error_before or 0.0) if weighted else None
        rows.append(
            [
                step.step,
                step.method,
                step.removed,
                step.sparsity,
                len(refit),
                "-" if worst is None else f"{worst.error_before:.2e} -> {worst.error_after:.2e}",
                "-" if step.top1_agreement is None else step.top1_agreement,
                "-" if step.rel_error is None else f"{step.rel_error:.2e}",
                "yes" if step.accepted else "rolled back",
            ]
        )
    headers = ["step", "rule", "removed", "sparsity", "refit", "worst layer error", "agree", "rel_err"]
    headers.append("accepted")
    return format_table(headers, rows)


#: Fewer held-out samples than this make a 0.99 agreement guard coarse (one mismatch is 1/N).
COARSE_GUARD = 500


def op_table(summary: ModelSummary) -> str:
    """Op types with their counts before and after, in the style of onnxsim."""
    ops = sorted(set(summary.op_counts_before) | set(summary.op_counts_after))
    rows: list[list[Any]] = [
        [op, summary.op_counts_before.get(op, 0), summary.op_counts_after.get(op, 0)] for op in ops
    ]
    rows.append(["(depth)", summary.depth_before, summary.depth_after])
    rows.append(["(non-linear depth)", summary.nonlinear_depth_before, summary.nonlinear_depth_after])
    return format_table(["op", "before", "after"], rows)


def _count(value: int | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def compression_summary(report: CompressionReport, written: list[str]) -> str:
    """The closing summary of a compress run, within 100 columns."""
    m, fid = report.model, report.fidelity
    agreement = "-" if fid.top1_agreement is None else f"{fid.top1_agreement:.4f}"
    lines = [
        f"sparsity    {m.sparsity:.3f} of {m.prunable_weights} prunable weights in "
        f"{m.prunable_layers} layers, {len(report.steps)} steps (stop: {report.stop.reason})",
        f"depth       {m.depth_before} -> {m.depth_after} layers; non-linear {m.nonlinear_depth_before} -> "
        f"{m.nonlinear_depth_after}; zero-entropy layers {m.zero_entropy_layers_before} -> "
        f"{m.zero_entropy_layers_after}",
        f"fidelity    top-1 agreement {agreement}, relative error {fid.rel_error:.2e} on {fid.samples} "
        f"{fid.data} samples",
    ]
    if fid.accuracy_before is not None and fid.accuracy_after is not None:
        lines.append(f"accuracy    {fid.accuracy_before:.4f} -> {fid.accuracy_after:.4f}")
    b, a = report.cost.before, report.cost.after
    lines.append(
        f"size        {_count(b.nonzero_params)} -> {_count(a.nonzero_params)} non-zero parameters; "
        f"MACs {_count(b.macs)} -> {_count(a.macs)} dense, {_count(a.nonzero_macs)} non-zero"
    )
    if report.timing is not None:
        for t in report.timing.batches:
            lines.append(
                f"latency     batch {t.batch_size}: {t.median_ms_before:.3f} ms (IQR "
                f"{t.iqr_ms_before:.3f}) -> {t.median_ms_after:.3f} ms (IQR {t.iqr_ms_after:.3f}), "
                f"{t.speedup:.2f}x; median of "
                f"{t.runs} interleaved runs, onnxruntime CPU"
            )
    s = report.surgery
    if not s.enabled:
        lines.append("surgery     off (--no-surgery)")
    else:
        applied = sum(r.applied for r in s.rewrites)
        declined = len(s.rewrites) - applied
        text = f"surgery     {applied} rewrites" + (
            f", {declined} inexact merges declined" if declined else ""
        )
        if s.reverted:
            text += f"; REVERTED: {s.revert_reason}"
        elif s.rel_error is not None:
            text += f"; differs from the pruned model by {s.rel_error:.1e}"
        lines.append(text)
    settings = report.settings
    thresholds = settings.get("min_agreement") is not None or settings.get("max_rel_error") is not None
    if settings.get("guard") and thresholds:
        rule = (
            f"top-1 agreement >= {settings['min_agreement']}"
            if settings.get("min_agreement") is not None
            else f"relative error <= {settings['max_rel_error']}"
        )
        text = f"guard       {rule} on {fid.samples} {fid.data} samples"
        if fid.samples < COARSE_GUARD:
            text += f" (coarse: fewer than {COARSE_GUARD} samples; give --eval or more data)"
        if report.stop.reason == "guard":
            text += f"; stopped: {report.stop.detail}"
        lines.append(text)
    elif not settings.get("guard", True):
        lines.append("guard       off (--no-guard)")
    wrapped = [textwrap.fill(line, width=100, subsequent_indent=" " * 12) for line in lines]
    wrapped.extend(f"{'written' if i == 0 else '':12}{path}" for i, path in enumerate(written))
    return "\n".join(wrapped)
