"""The bodies of `egp-onnx analyze`, `stats`, `compress` and `verify`: plan, run, write, render."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from egp_onnx.api.analyze import analyze, statistics
from egp_onnx.api.compress import compress
from egp_onnx.cli import options
from egp_onnx.cli.files import OutputPlan, OutputWriter, model_inputs, plan_outputs
from egp_onnx.cli.run import StderrProgress, run
from egp_onnx.config import Settings
from egp_onnx.load.calibration import open_calibration
from egp_onnx.load.model import external_data_path, load_model
from egp_onnx.load.stats_file import model_fingerprint, statistics_bytes
from egp_onnx.report.plot import plot_format, render_plot
from egp_onnx.report.render import (
    agreement_line,
    analysis_summary,
    analysis_table,
    compression_summary,
    compression_table,
    op_table,
    outputs_table,
    statistics_line,
    steps_table,
    to_json,
)
from egp_onnx.verify.fidelity import compare
from egp_onnx.verify.guard import guard_problems


def _write_all(plan: OutputPlan, files: list[tuple[Path, bytes]]) -> None:
    """Stage every (path, bytes) output of a run and commit them together."""
    with OutputWriter(plan) as writer:
        for path, data in files:
            writer.write_bytes(path, data)
        writer.commit()


def _data(params: dict[str, Any]) -> dict[str, Any]:
    """The data options as the API's keywords, checked (--batch-size first)."""
    Settings(batch_size=params["batch_size"]).check()
    return {"batch_size": params["batch_size"], "data": options.data_config(params)}


@click.command("analyze")
@click.argument("model", type=click.Path(path_type=Path))
@options.data_options(required=False)
@options.STATS
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    help="Write the per-rectifier statistics as JSON here.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --json file.")
def analyze_command(**params: Any) -> None:
    """Print the entropy and ON/OFF channel counts of every rectifier of MODEL.

    The counts come from --calib, from --stats files, or from both, merged.
    """

    def action() -> None:
        data = _data(params)
        model, calib, json_path, stats = (
            params["model"],
            params["calib"],
            params["json_path"],
            params["stats_paths"],
        )
        reads = [*model_inputs(model), *options.reads(("--calib", calib), *(("--stats", p) for p in stats))]
        plan = plan_outputs([json_path], reads, params["force"])  # before any work
        progress = StderrProgress(sys.stderr.isatty())
        report = analyze(model, calib, stats=stats, progress=progress, **data)
        progress.close()
        click.echo(analysis_table(report))
        click.echo(f"\n{analysis_summary(report)}")
        if json_path is not None:
            _write_all(plan, [(json_path, to_json(report).encode("utf-8"))])
            click.echo(f"report: {json_path}")

    run(action)


@click.command("stats")
@click.argument("model", type=click.Path(path_type=Path))
@options.data_options()
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="The statistics file (.npz)."
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def stats_command(**params: Any) -> None:
    """Count ON events per channel of MODEL on --calib and save them to OUTPUT.

    Counts are sums: files computed on disjoint parts of a calibration set (on other machines)
    merge exactly with `analyze --stats a.npz --stats b.npz` or `compress --stats ...`.
    """

    def action() -> None:
        data = _data(params)
        model, calib, output = params["model"], params["calib"], params["output"]
        plan = plan_outputs(
            [output], [*model_inputs(model), *options.reads(("--calib", calib))], params["force"]
        )
        progress = StderrProgress(sys.stderr.isatty())
        proto, _, sites, stats = statistics(model, calib, progress=progress, **data)
        progress.close()
        _write_all(plan, [(output, statistics_bytes(stats, model_fingerprint(proto)))])
        click.echo(statistics_line(stats.samples, len(sites), output))

    run(action)


@options.in_order(options.COMPRESS_HELP_ORDER)
@click.command("compress")
@click.argument("model", type=click.Path(path_type=Path))
@options.compress_options
def compress_command(**params: Any) -> None:
    """Prune MODEL with Entropy-Guided Pruning, reduce its depth, and write it to OUTPUT."""

    def action() -> None:
        settings = options.compress_settings(params)
        data = options.data_config(params)
        finetune = options.FinetuneArgs.of(params)
        output, report_path, plot_path = params["output"], params["report_path"], params["plot_path"]
        reads = [
            *model_inputs(params["model"]),
            *options.reads(
                ("--calib", params["calib"]),
                ("--eval", params["eval_path"]),
                *(("--stats", p) for p in params["stats_paths"]),
                *finetune.reads(),
            ),
        ]
        plan = _plan_compress(params, reads)
        plot_type = None if plot_path is None else plot_format(plot_path)  # matplotlib is there
        callback = finetune.callback()
        progress = StderrProgress(sys.stderr.isatty() and not params["quiet"])
        result = compress(
            params["model"],
            params["calib"],
            settings,
            eval_data=params["eval_path"],
            stats=params["stats_paths"],
            finetune=callback,
            data=data,
            progress=progress,
        )
        progress.close()
        with OutputWriter(plan) as writer:  # every output written, then all committed together
            writer.write_model(result.model, output, external=True if params["external_data"] else None)
            if report_path is not None:
                writer.write_bytes(report_path, to_json(result.report).encode("utf-8"))
            if plot_path is not None and plot_type is not None:
                writer.write_bytes(plot_path, render_plot(result.report, plot_type))
            writer.commit()
        if not params["quiet"]:
            tables = [
                compression_table(result.report),
                op_table(result.report.model),
                steps_table(result.report),
            ]
            written = [str(p) for p in (output, report_path, plot_path) if p is not None]
            click.echo("\n\n".join([*tables, compression_summary(result.report, written)]))

    run(action, quiet=params["quiet"])


def _plan_compress(params: dict[str, Any], reads: list[Any]) -> OutputPlan:
    """The model, its external data file, the report and the plot: planned before any work."""
    output, external = params["output"], params["external_data"]
    data_file = external_data_path(output)
    return plan_outputs(
        [output, data_file if external else None, params["report_path"], params["plot_path"]],
        reads,
        params["force"],
        possible=[] if external else [data_file],
    )


@click.command("verify")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("compressed", type=click.Path(path_type=Path))
@options.VERIFY
def verify_command(**params: Any) -> None:
    """Compare COMPRESSED with ORIGINAL on --data; exit 0 when it passes, 1 when it does not.

    Without --min-agreement every output must satisfy |c - o| <= atol + rtol |o| everywhere
    (as Polygraphy checks, the atol capped at half the output's magnitude); with it,
    the argmax agreement of every classifier (N, classes) and sequence output decides, as measured.
    """

    def action() -> None:
        options.check_verify(params)
        atol, rtol, min_agreement = params["atol"], params["rtol"], params["min_agreement"]
        reference, candidate = load_model(params["original"]), load_model(params["compressed"])
        data = open_calibration(params["data"], reference)
        fidelity = compare(reference, candidate, data, params["batch_size"], atol, rtol)
        click.echo(outputs_table(fidelity))
        click.echo(f"\n{agreement_line(fidelity)}")
        if min_agreement is not None:
            problems = guard_problems(fidelity, min_agreement, None, z=0.0)
        else:
            problems = [
                f"output {o.name} is not within atol {atol} / rtol {rtol}"
                for o in fidelity.outputs
                if not o.allclose
            ]
        if problems:
            click.echo("FAIL: " + "; ".join(problems))
            sys.exit(1)
        click.echo("PASS")

    run(action)
