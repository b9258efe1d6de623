"""Typed records of an analysis or compression run, their JSON form and their text tables."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

SCHEMA_VERSION = 1


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
class StepRecord:
    """One pruning step of the loop."""

    step: int
    method: str  # egp | magnitude | magnitude-fallback
    removed: int
    sparsity: float  # of the prunable weights after the step
    zero_entropy_layers: int  # after the step
    emptied_layers: int  # layers with no non-zero weight after the step


@dataclass(frozen=True)
class Rewrite:
    """One graph rewrite that surgery applied or declined."""

    kind: str  # fold_bn | zero_off_channels | remove_rectifier | fold_constant | merge | fold_residual
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
    reverted: bool  # True when the check failed and the un-rewritten model was kept


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
    samples: int
    layers: tuple[LayerRecord, ...]
    steps: tuple[StepRecord, ...]
    model: ModelSummary
    surgery: SurgeryRecord
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


def op_table(summary: ModelSummary) -> str:
    """Op types with their counts before and after, in the style of onnxsim."""
    ops = sorted(set(summary.op_counts_before) | set(summary.op_counts_after))
    rows: list[list[Any]] = [
        [op, summary.op_counts_before.get(op, 0), summary.op_counts_after.get(op, 0)] for op in ops
    ]
    rows.append(["(depth)", summary.depth_before, summary.depth_after])
    rows.append(["(non-linear depth)", summary.nonlinear_depth_before, summary.nonlinear_depth_after])
    return format_table(["op", "before", "after"], rows)
