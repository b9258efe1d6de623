"""Command line: `egp-onnx analyze` and `egp-onnx compress`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from egp_onnx import __version__
from egp_onnx.errors import EgpError
from egp_onnx.io import check_output_paths, save_model, save_text
from egp_onnx.pipeline import METHODS, analyze, compress
from egp_onnx.report import SurgeryRecord, analysis_table, compression_table, op_table, to_json

F = TypeVar("F", bound=Callable[..., Any])


class _StderrProgress:
    """Stage lines and a running sample count on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.text = ""
        self.samples = 0

    def stage(self, text: str) -> None:
        if self.enabled:
            if self.text:
                click.echo(err=True)
            self.text, self.samples = text, 0
            click.echo(f"\r{text} ...", nl=False, err=True)

    def advance(self, samples: int) -> None:
        if self.enabled:
            self.samples += samples
            click.echo(f"\r{self.text} ... {self.samples} samples", nl=False, err=True)

    def close(self) -> None:
        if self.enabled and self.text:
            click.echo(err=True)


def _surgery_line(record: SurgeryRecord) -> str:
    if not record.enabled:
        return "graph surgery: off (--no-surgery)"
    applied = [r for r in record.rewrites if r.applied]
    skipped = len(record.rewrites) - len(applied)
    line = f"graph surgery: {len(applied)} rewrites" + (
        f", {skipped} inexact merges declined" if skipped else ""
    )
    if record.reverted:
        return line + f"; REVERTED: output changed by {record.rel_error:.2e} on the calibration data"
    if record.rel_error is not None:
        line += f"; output difference on the calibration data {record.rel_error:.1e} (relative)"
    return line


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from exc


def _data_options(func: F) -> F:
    func = click.option(
        "--std", default="1", show_default=True, help="Per-channel std for image folders (comma list)."
    )(func)
    func = click.option(
        "--mean",
        default="0",
        show_default=True,
        help="Per-channel mean for image folders, after scaling pixels to [0, 1] (comma list).",
    )(func)
    func = click.option(
        "--batch-size", type=int, default=32, show_default=True, help="Samples per onnxruntime call."
    )(func)
    func = click.option(
        "--calib",
        required=True,
        type=click.Path(path_type=Path),
        help="Calibration data: .npz keyed by input name (optional 'labels'), .npy, "
        "or a folder of those or of images.",
    )(func)
    return func


def _run(action: Callable[[], None]) -> None:
    """Run a command; EgpError becomes one line on stderr and its exit code."""
    try:
        action()
    except EgpError as exc:
        click.echo(f"egp-onnx: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("egp-onnx: interrupted; nothing was written", err=True)
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="egp-onnx")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
def main(verbose: bool) -> None:
    """Entropy-Guided Pruning for ONNX models.

    Measures how often each ReLU channel is ON on calibration data and prunes the weights
    where the entropy is lowest, so that whole layers become removable.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="egp-onnx: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


@main.command("analyze")
@click.argument("model", type=click.Path(path_type=Path))
@_data_options
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    help="Write the per-rectifier statistics as JSON here.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --json file.")
def analyze_command(
    model: Path, calib: Path, batch_size: int, mean: str, std: str, json_path: Path | None, force: bool
) -> None:
    """Print the entropy and ON/OFF channel counts of every rectifier of MODEL."""

    def action() -> None:
        check_output_paths([json_path], [model], force)
        progress = _StderrProgress(sys.stderr.isatty())
        report = analyze(
            model, calib, batch_size=batch_size, mean=_floats(mean), std=_floats(std), progress=progress
        )
        progress.close()
        click.echo(analysis_table(report))
        prunable = sum(r.prunable for r in report.layers)
        zero = sum(r.prunable and r.entropy == 0 for r in report.layers)
        click.echo(f"\n{report.samples} samples; {prunable} prunable rectifiers, {zero} with zero entropy")
        if json_path is not None:
            save_text(to_json(report), json_path)
            click.echo(f"report: {json_path}")

    _run(action)


@main.command("compress")
@click.argument("model", type=click.Path(path_type=Path))
@_data_options
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Where to write the pruned model."
)
@click.option(
    "--sparsity",
    type=float,
    default=0.9,
    show_default=True,
    help="Fraction of the prunable weights to zero, in [0, 1).",
)
@click.option(
    "--step",
    type=float,
    default=0.5,
    show_default=True,
    help="Fraction of the remaining weights removed per EGP step, in (0, 1].",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="egp",
    show_default=True,
    help="egp, or global magnitude pruning as a baseline.",
)
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Order among weights of equal magnitude."
)
@click.option("--no-surgery", is_flag=True, help="Only zero weights; keep the graph as it is.")
@click.option(
    "--merge-tolerance",
    type=float,
    default=0.0,
    show_default=True,
    help="Apply a merge that is not exact when its relative output error on the calibration "
    "data is at most this; 0 applies exact rewrites only.",
)
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def compress_command(
    model: Path,
    calib: Path,
    batch_size: int,
    mean: str,
    std: str,
    output: Path,
    sparsity: float,
    step: float,
    method: str,
    report_path: Path | None,
    seed: int,
    no_surgery: bool,
    merge_tolerance: float,
    force: bool,
) -> None:
    """Prune MODEL with Entropy-Guided Pruning, reduce its depth, and write it to OUTPUT."""

    def action() -> None:
        check_output_paths([output, report_path], [model, calib], force)
        progress = _StderrProgress(sys.stderr.isatty())
        result = compress(
            model,
            calib,
            sparsity=sparsity,
            step=step,
            method=method,
            batch_size=batch_size,
            seed=seed,
            surgery=not no_surgery,
            merge_tolerance=merge_tolerance,
            mean=_floats(mean),
            std=_floats(std),
            progress=progress,
        )
        progress.close()
        save_model(result.model, output)
        if report_path is not None:
            save_text(to_json(result.report), report_path)
        report = result.report
        summary = report.model
        click.echo(compression_table(report))
        click.echo()
        click.echo(op_table(summary))
        click.echo(
            f"\nsparsity {summary.sparsity:.3f} of {summary.prunable_weights} prunable weights in "
            f"{summary.prunable_layers} layers ({len(report.steps)} steps, "
            f"{report.samples} calibration samples)\n"
            f"zero-entropy layers {summary.zero_entropy_layers_before} -> "
            f"{summary.zero_entropy_layers_after}; non-zero parameters "
            f"{summary.nonzero_params_before} -> {summary.nonzero_params_after}\n"
            f"depth {summary.depth_before} -> {summary.depth_after}; non-linear depth "
            f"{summary.nonlinear_depth_before} -> {summary.nonlinear_depth_after}"
        )
        click.echo(_surgery_line(report.surgery))
        click.echo(f"model: {output}" + (f"\nreport: {report_path}" if report_path else ""))

    _run(action)
