"""Text and JSON renderings of the report records: tables, the closing summary, the JSON text."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from egp_onnx.config import Settings
from egp_onnx.report.records import (
    AnalysisReport,
    CompressionReport,
    Fidelity,
    GuardFailureReport,
    ModelSummary,
)


def to_json(report: AnalysisReport | CompressionReport | GuardFailureReport) -> str:
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


def _record_rows(records: Iterable[Any], fields: Sequence[str]) -> list[list[Any]]:
    """One row per record: the named fields, booleans as yes/no."""
    rows = [[getattr(record, name) for name in fields] for record in records]
    return [[("yes" if v else "no") if isinstance(v, bool) else v for v in row] for row in rows]


#: (header, record field) of each column of the two per-layer tables.
_ANALYSIS_COLUMNS = (
    ("rectifier", "rectifier"), ("act", "activation"), ("layer", "name"), ("op", "op_type"),
    ("ch", "channels"), ("on", "always_on"), ("off", "always_off"), ("on_frac", "on_fraction"),
    ("entropy", "entropy"), ("prunable", "prunable"),
)  # fmt: skip
_COMPRESSION_COLUMNS = (
    ("layer", "name"), ("op", "op_type"), ("weights", "weights"), ("nonzero", "nonzero"),
    ("sparsity", "sparsity"), ("H_before", "entropy_before"), ("H_after", "entropy"), ("on", "always_on"),
    ("off", "always_off"), ("state", "state"),
)  # fmt: skip


def analysis_table(report: AnalysisReport) -> str:
    """One row per activation."""
    headers, fields = zip(*_ANALYSIS_COLUMNS, strict=True)
    return format_table(list(headers), _record_rows(report.layers, fields))


def compression_table(report: CompressionReport) -> str:
    """One row per prunable layer."""
    headers, fields = zip(*_COMPRESSION_COLUMNS, strict=True)
    return format_table(list(headers), _record_rows(report.layers, fields))


def steps_table(report: CompressionReport) -> str:
    """One row per loop step: what it pruned, how the refit went, what the guard said."""
    regions = any(step.iou is not None for step in report.steps)
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
                "-" if step.estimate is None else step.estimate,
                "-" if step.rel_error is None else f"{step.rel_error:.2e}",
                *([] if not regions else ["-" if step.iou is None else f"{step.iou:.4f}"]),
                "yes" if step.accepted else "rolled back",
            ]
        )
    headers = ["step", "rule", "removed", "sparsity", "refit", "worst layer error", "agree", "estimate"]
    headers.append("rel_err")
    if regions:
        headers.append("iou")  # a probability map's regions
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
    lines = [line for render in _SUMMARY_LINES for line in render(report)]
    wrapped = [textwrap.fill(line, width=100, subsequent_indent=" " * 12) for line in lines]
    wrapped.extend(f"{'written' if i == 0 else '':12}{path}" for i, path in enumerate(written))
    return "\n".join(wrapped)


def _sparsity_line(report: CompressionReport) -> list[str]:
    m = report.model
    return [
        f"sparsity    {m.sparsity:.3f} of {m.prunable_weights} prunable weights in "
        f"{m.prunable_layers} layers, {len(report.steps)} steps (stop: {report.stop.reason})"
    ]


def _depth_line(report: CompressionReport) -> list[str]:
    m = report.model
    return [
        f"depth       {m.depth_before} -> {m.depth_after} layers; non-linear {m.nonlinear_depth_before} -> "
        f"{m.nonlinear_depth_after}; zero-entropy layers {m.zero_entropy_layers_before} -> "
        f"{m.zero_entropy_layers_after}"
    ]


def _fidelity_line(report: CompressionReport) -> list[str]:
    fid = report.fidelity
    agreement = "-" if fid.top1_agreement is None else f"{fid.top1_agreement:.4f}"
    lines = [
        f"fidelity    top-1 agreement {agreement}, relative error {fid.rel_error:.2e} on {fid.samples} "
        f"{fid.data} samples"
    ]
    lines.extend(region_lines(fid))
    estimate = estimate_line(fid)
    return [*lines, estimate] if estimate else lines


def region_lines(fid: Fidelity) -> list[str]:
    """One line per probability map: the mean IoU of its thresholded regions, its spread and worst sample."""
    return [
        f"regions     {out.name}: mean IoU {out.iou:.4f} (standard error {out.iou_se or 0.0:.4f}, worst "
        f"sample {out.iou_worst:.4f}) of the regions > {out.threshold:g} on {fid.samples} {fid.data} samples"
        for out in fid.outputs
        if out.iou is not None and out.iou_worst is not None and out.threshold is not None
    ]


def estimate_line(fid: Fidelity) -> str:
    """The estimate of unseen agreement, its 95% interval and the data it came from ("" when none)."""
    if fid.estimate is None or fid.estimate_low is None or fid.estimate_high is None:
        return ""
    source = (
        f"the agreement on {fid.samples} {fid.data} samples marked unseen, as is"
        if fid.unseen
        else f"{fid.samples} {fid.data} samples ({fid.estimate_rule})"
    )
    return (
        f"unseen      top-1 agreement estimated {fid.estimate:.4f} (95%: {fid.estimate_low:.4f}-"
        f"{fid.estimate_high:.4f}) from {source}"
    )


def _accuracy_line(report: CompressionReport) -> list[str]:
    fid = report.fidelity
    if fid.accuracy_before is None or fid.accuracy_after is None:
        return []
    return [f"accuracy    {fid.accuracy_before:.4f} -> {fid.accuracy_after:.4f}"]


def _size_line(report: CompressionReport) -> list[str]:
    b, a = report.cost.before, report.cost.after
    return [
        f"size        {_count(b.nonzero_params)} -> {_count(a.nonzero_params)} non-zero parameters; "
        f"MACs {_count(b.macs)} -> {_count(a.macs)} dense, {_count(a.nonzero_macs)} non-zero"
        + (f" at {_shapes_text(report.cost.input_shapes)}" if report.cost.input_shapes else "")
    ]


def _shapes_text(shapes: dict[str, tuple[int, ...]]) -> str:
    """Input shapes for the summary: ``x 1x3x640x480``."""
    return ", ".join(f"{name} {'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def _bytes(value: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def _file_line(report: CompressionReport) -> list[str]:
    b, a = report.cost.before, report.cost.after
    text = f"file        {_bytes(b.file_bytes)} -> {_bytes(a.file_bytes)}"
    if b.deflate_bytes is not None and a.deflate_bytes is not None:
        ratio = b.deflate_bytes / max(a.deflate_bytes, 1)
        text += f"; deflated (zlib 9) {_bytes(b.deflate_bytes)} -> {_bytes(a.deflate_bytes)}"
        text += f", {ratio:.2f}x smaller"
    elif a.deflate_bytes is not None:
        text += f"; deflated (zlib 9) {_bytes(a.deflate_bytes)}"
    return [text]


def _quantize_line(report: CompressionReport) -> list[str]:
    q = report.quantization
    if q is None:
        return []
    if not q.applied:
        return [f"quantize    {q.mode} NOT APPLIED, the float model is written: {q.reason}"]
    agreement = "-" if q.top1_agreement is None else f"{q.top1_agreement:.4f}"
    accuracy = "" if q.accuracy is None else f", accuracy {q.accuracy:.4f}"
    rel = "-" if q.rel_error is None else f"{q.rel_error:.2e}"
    return [
        f"quantize    {q.mode} (QDQ, per-channel symmetric weights) on {q.calibration_samples} calibration "
        f"samples: top-1 agreement {agreement}{accuracy}, relative error {rel}; "
        f"{q.zero_weights_checked} pruned weights checked to stay exactly 0"
    ]


def _latency_lines(report: CompressionReport) -> list[str]:
    if report.timing is None:
        return []
    return [
        f"latency     batch {t.batch_size}: {t.median_ms_before:.3f} ms (IQR "
        f"{t.iqr_ms_before:.3f}) -> {t.median_ms_after:.3f} ms (IQR {t.iqr_ms_after:.3f}), "
        f"{t.speedup:.2f}x; median of "
        f"{t.runs} interleaved runs, onnxruntime CPU"
        for t in report.timing.batches
    ]


def _channels_line(report: CompressionReport) -> list[str]:
    c = report.channels
    if c is None:
        return []
    total = sum(g.channels for g in c.groups)
    exact = sum(g.always_off_removed for g in c.groups)
    return [
        f"channels    {c.removed} of {total} removed in {len(c.groups)} groups ({exact} always OFF), "
        f"{len(c.tied)} layers tied"
        + (f", residual branches emptied: {len(c.branches)} (the block is x + c)" if c.branches else "")
        + f"; MACs {_count(c.macs_before)} -> {_count(c.macs_after)} (stop: {c.stop})"
    ]


def _surgery_line(report: CompressionReport) -> list[str]:
    s = report.surgery
    if not s.enabled:
        return ["surgery     off (--no-surgery)"]
    applied = sum(r.applied for r in s.rewrites)
    declined = len(s.rewrites) - applied
    text = f"surgery     {applied} rewrites" + (f", {declined} inexact merges declined" if declined else "")
    if s.reverted:
        text += f"; REVERTED: {s.revert_reason}"
    elif s.rel_error is not None:
        text += f"; differs from the pruned model by {s.rel_error:.1e}"
    return [text]


def _guard_line(report: CompressionReport) -> list[str]:
    settings, fid = Settings(**report.settings), report.fidelity
    if not settings.guard:
        return ["guard       off (--no-guard)"]
    if not settings.guarded:
        return []
    rules = []
    if settings.min_agreement is not None:
        rules.append(f"estimated unseen agreement >= {settings.min_agreement} (classifier, sequence outputs)")
    if settings.min_iou is not None:
        rules.append(
            f"mean IoU of the regions > {settings.map_threshold:g} >= {settings.min_iou} (probability maps)"
        )
    if settings.max_rel_error is not None:
        judged = settings.min_agreement is not None or settings.min_iou is not None
        others = "other outputs" if judged else "every output"
        rules.append(f"relative error <= {settings.max_rel_error} ({others})")
    rule = ", ".join(rules)
    text = f"guard       {rule} on {fid.samples} {fid.data} samples"
    if fid.samples < COARSE_GUARD:
        text += f" (coarse: fewer than {COARSE_GUARD} samples; give --eval or more data)"
    if settings.sensitivity and settings.sparsity > 0:
        text += "; each layer capped where pruning it alone moves these samples (--no-sensitivity skips)"
    if report.stop.reason == "guard":
        text += f"; stopped: {report.stop.detail}"
    return [text]


#: The summary's lines in order; each gives none, one or several lines.
_SUMMARY_LINES: tuple[Callable[[CompressionReport], list[str]], ...] = (
    _sparsity_line,
    _depth_line,
    _fidelity_line,
    _accuracy_line,
    _size_line,
    _channels_line,
    _file_line,
    _latency_lines,
    _surgery_line,
    _quantize_line,
    _guard_line,
)


def analysis_summary(report: AnalysisReport) -> str:
    """The closing line of an analysis: samples, prunable rectifiers, those with zero entropy."""
    prunable = sum(r.prunable for r in report.layers)
    zero = sum(r.prunable and r.entropy == 0 for r in report.layers)
    return f"{report.samples} samples; {prunable} prunable rectifiers, {zero} with zero entropy"


def statistics_line(samples: int, rectifiers: int, path: object) -> str:
    """What `egp-onnx stats` counted and where it wrote the counts."""
    return f"{samples} samples, {rectifiers} rectifiers: {path}"


def outputs_table_rows(fidelity: Fidelity) -> Iterable[list[object]]:
    """Rows (output, kind, agreement, rel_error, max_abs_error, allclose) for printing."""
    for out in fidelity.outputs:
        agreement = "-" if out.agreement is None else f"{out.agreement:.4f}"
        close = "yes" if out.allclose else "NO"
        yield [out.name, out.kind, agreement, f"{out.rel_error:.3e}", f"{out.max_abs_error:.3e}", close]


def outputs_table(fidelity: Fidelity) -> str:
    """One row per output of a comparison."""
    headers = ["output", "kind", "agreement", "rel_error", "max_abs_error", "allclose"]
    return format_table(headers, list(outputs_table_rows(fidelity)))


def agreement_line(fidelity: Fidelity) -> str:
    """Samples compared and the top-1 agreement ("-" when the first output is not (N, classes))."""
    agreement = fidelity.top1_agreement
    shown = "-" if agreement is None else f"{agreement:.4f}"
    return f"{fidelity.samples} samples; top-1 agreement {shown}"
