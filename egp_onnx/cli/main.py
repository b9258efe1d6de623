"""Command line: `egp-onnx analyze`, `egp-onnx compress` and `egp-onnx verify`."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from egp_onnx import __version__
from egp_onnx.api.compress import METHODS, analyze, compress, statistics
from egp_onnx.cli.files import InputPath, OutputPlan, OutputWriter, input_path, model_inputs, plan_outputs
from egp_onnx.cli.plugins import load_attribute, source_file
from egp_onnx.config import SELECTIONS, SPARSITY_CEILING, Settings, check_positive, check_tolerances
from egp_onnx.errors import INTERNAL_ERROR_EXIT, ConfigError, EgpError, one_line
from egp_onnx.load.calibration import open_calibration
from egp_onnx.load.model import external_data_path, load_model, model_fingerprint, statistics_bytes
from egp_onnx.report.plot import plot_format, render_plot
from egp_onnx.report.records import (
    analysis_table,
    compression_summary,
    compression_table,
    format_table,
    op_table,
    steps_table,
    to_json,
)
from egp_onnx.report.render import outputs_table_rows
from egp_onnx.verify.fidelity import compare
from egp_onnx.verify.guard import guard_problems

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


def _finetune_callback(
    spec: str | None, torch_model: str | None, train: Path | None, epochs: int, lr: float
) -> Callable[..., Any] | None:
    """The finetune callback the options ask for, or None."""
    if spec and torch_model:
        raise ConfigError("give either --finetune or --torch-model, not both")
    if spec:
        function = load_attribute(spec, "--finetune")
        if not callable(function):
            raise ConfigError(f"--finetune: {spec} is not callable")
        return function
    if torch_model is None:
        if train is not None:
            raise ConfigError("--train is used with --torch-model")
        return None
    if train is None:
        raise ConfigError("--torch-model needs --train PATH (an .npz with inputs and labels)")
    try:
        from egp_onnx.integrations.torch import ClassificationFinetune
    except ImportError as exc:
        raise ConfigError(str(exc)) from exc
    factory = load_attribute(torch_model, "--torch-model")
    try:
        module = factory()
    except Exception as exc:  # the user's factory may fail in any way
        raise ConfigError(f"--torch-model: {torch_model}() failed: {type(exc).__name__}: {exc}") from exc
    try:
        return ClassificationFinetune(module, train, epochs=epochs, lr=lr)
    except (OSError, KeyError, ValueError, StopIteration) as exc:
        raise ConfigError(f"--train {train}: needs an .npz with an input array and 'labels' ({exc})") from exc


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"--mean/--std take comma-separated numbers, got {text!r}") from exc
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--mean/--std take finite numbers, got {text!r}")
    return values


def _check_data_options(batch_size: int, workers: int, mean: str, std: str) -> None:
    """Refuse bad data options before any work starts."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"--workers must be at least 0, got {workers}")
    _floats(mean)
    if any(v == 0 for v in _floats(std)):
        raise ConfigError("--std values must be non-zero")


def _reads(*named: tuple[str, Path | None]) -> list[InputPath]:
    """The inputs named by options (None: not given)."""
    return [input_path(option, path) for option, path in named if path is not None]


def _write_all(plan: OutputPlan, files: list[tuple[Path, bytes]]) -> None:
    """Stage every (path, bytes) output of a run and commit them together."""
    with OutputWriter(plan) as writer:
        for path, data in files:
            writer.write_bytes(path, data)
        writer.commit()


def _stats_option(func: F) -> F:
    return click.option(
        "--stats",
        "stats_paths",
        multiple=True,
        type=click.Path(path_type=Path),
        help="Statistics file from `egp-onnx stats` (repeat to merge shards).",
    )(func)


def _data_options(required: bool = True) -> Callable[[F], F]:
    """--calib, --batch-size, --mean and --std."""
    return lambda func: _add_data_options(func, required)


def _add_data_options(func: F, required: bool) -> F:
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
        "--workers", type=int, default=0, show_default=True, help="Threads that load calibration files ahead."
    )(func)
    func = click.option(
        "--batch-size", type=int, default=32, show_default=True, help="Samples per onnxruntime call."
    )(func)
    func = click.option(
        "--calib",
        required=required,
        type=click.Path(path_type=Path),
        help="Calibration data: .npz keyed by input name (optional 'labels'), .npy, "
        "or a folder of those or of images.",
    )(func)
    return func


def _log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, *args: Any, **kwargs: Any
) -> None:
    """Python warnings as one log line (they obey --quiet like every other warning)."""
    logging.getLogger("egp_onnx").warning("%s: %s", category.__name__, one_line(Exception(str(message))))


def _debug() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


def _run(action: Callable[[], None], quiet: bool = False) -> None:
    """Run a command: whatever goes wrong becomes one line on stderr and a documented exit code.

    EgpError: its exit code (2, or 1 for a failed guard); an interrupt: 130; anything else is a
    defect of egp-onnx: exit code 3. `egp-onnx --debug` prints the trace as well.
    """
    try:
        with warnings.catch_warnings(), _quiet(quiet):
            warnings.showwarning = _log_warning
            action()
    except EgpError as exc:
        if _debug():
            traceback.print_exc()
        click.echo(f"egp-onnx: {exc.label}: {one_line(exc, limit=2000)}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("egp-onnx: interrupted; nothing was written", err=True)
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except MemoryError:
        click.echo("egp-onnx: error: out of memory; lower --batch-size or use fewer samples", err=True)
        sys.exit(INTERNAL_ERROR_EXIT)
    except Exception as exc:  # the last resort: no traceback reaches the user without --debug
        if _debug():
            traceback.print_exc()
        click.echo(
            f"egp-onnx: internal error: {type(exc).__name__}: {one_line(exc)} (a defect of egp-onnx; "
            "rerun as egp-onnx --debug ... for the trace)",
            err=True,
        )
        sys.exit(INTERNAL_ERROR_EXIT)


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """With --quiet, only errors are logged while the block runs."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("egp_onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


#: click >= 8.2 raises this for a group called without arguments; it shows the help.
_NO_ARGS_IS_HELP: tuple[type[click.UsageError], ...] = tuple(
    t for t in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if t is not None
)


class _Group(click.Group):
    """A command group whose usage errors are one line on stderr, like every other error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run the command line; click's own errors become `egp-onnx: error: ...` and exit code 2."""
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except _NO_ARGS_IS_HELP as exc:  # `egp-onnx` alone: the help, as click prints it
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see {exc.ctx.command_path} --help)"
            click.echo(f"egp-onnx: error: {one_line(Exception(exc.format_message()))}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("egp-onnx: interrupted; nothing was written", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="egp-onnx")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
@click.option("--debug", is_flag=True, help="Print the Python trace of an error as well.")
def main(verbose: bool, debug: bool) -> None:
    """Entropy-Guided Pruning for ONNX models.

    Measures how often each ReLU channel is ON on calibration data and prunes the weights
    where the entropy is lowest, so that whole layers become removable. Exit codes: 0 done,
    1 a guard or `verify` failed, 2 bad input, 3 a defect of egp-onnx, 130 interrupted.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="egp-onnx: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


@main.command("analyze")
@click.argument("model", type=click.Path(path_type=Path))
@_data_options(required=False)
@_stats_option
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    help="Write the per-rectifier statistics as JSON here.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --json file.")
def analyze_command(
    model: Path,
    calib: Path | None,
    batch_size: int,
    workers: int,
    mean: str,
    std: str,
    stats_paths: tuple[Path, ...],
    json_path: Path | None,
    force: bool,
) -> None:
    """Print the entropy and ON/OFF channel counts of every rectifier of MODEL.

    The counts come from --calib, from --stats files, or from both, merged.
    """

    def action() -> None:
        _check_data_options(batch_size, workers, mean, std)
        reads = [*model_inputs(model), *_reads(("--calib", calib), *(("--stats", p) for p in stats_paths))]
        plan = plan_outputs([json_path], reads, force)  # before any work
        progress = _StderrProgress(sys.stderr.isatty())
        report = analyze(
            model,
            calib,
            stats=stats_paths,
            batch_size=batch_size,
            workers=workers,
            mean=_floats(mean),
            std=_floats(std),
            progress=progress,
        )
        progress.close()
        click.echo(analysis_table(report))
        prunable = sum(r.prunable for r in report.layers)
        zero = sum(r.prunable and r.entropy == 0 for r in report.layers)
        click.echo(f"\n{report.samples} samples; {prunable} prunable rectifiers, {zero} with zero entropy")
        if json_path is not None:
            _write_all(plan, [(json_path, to_json(report).encode("utf-8"))])
            click.echo(f"report: {json_path}")

    _run(action)


@main.command("stats")
@click.argument("model", type=click.Path(path_type=Path))
@_data_options()
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="The statistics file (.npz)."
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def stats_command(
    model: Path, calib: Path, batch_size: int, workers: int, mean: str, std: str, output: Path, force: bool
) -> None:
    """Count ON events per channel of MODEL on --calib and save them to OUTPUT.

    Counts are sums: files computed on disjoint parts of a calibration set (on other machines)
    merge exactly with `analyze --stats a.npz --stats b.npz` or `compress --stats ...`.
    """

    def action() -> None:
        _check_data_options(batch_size, workers, mean, std)
        plan = plan_outputs([output], [*model_inputs(model), *_reads(("--calib", calib))], force)
        progress = _StderrProgress(sys.stderr.isatty())
        proto, _, sites, stats = statistics(
            model,
            calib,
            batch_size=batch_size,
            workers=workers,
            mean=_floats(mean),
            std=_floats(std),
            progress=progress,
        )
        progress.close()
        _write_all(plan, [(output, statistics_bytes(stats, model_fingerprint(proto)))])
        click.echo(f"{stats.samples} samples, {len(sites)} rectifiers: {output}")

    _run(action)


@main.command("compress")
@click.argument("model", type=click.Path(path_type=Path))
@_data_options()
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Where to write the model."
)
@click.option(
    "--sparsity",
    type=float,
    default=SPARSITY_CEILING,
    show_default=True,
    help="Fraction of the prunable weights to zero, in [0, 1); with the guard (default) a ceiling: "
    "the run stops where the guard stops it. 0 changes no weight (exact rewrites only).",
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
@click.option(
    "--eval",
    "eval_path",
    type=click.Path(path_type=Path),
    help="Held-out data (any --calib format; 'labels' give accuracy).",
)
@click.option(
    "--holdout",
    type=float,
    help="Without --eval: split this fraction of --calib off as held-out data for the guard "
    "[default: min(max(500, N/4), N/2) samples; 0 measures on the calibration data itself].",
)
@click.option(
    "--min-agreement",
    type=float,
    help="Guard: lowest top-1 agreement with the original [default: 0.99 for classifier outputs].",
)
@click.option(
    "--max-rel-error",
    type=float,
    help="Guard: largest relative output error [default: 0.05 for outputs that are not (N, classes)].",
)
@click.option("--no-guard", is_flag=True, help="No fidelity guard: prune to --sparsity whatever it costs.")
@click.option(
    "--no-reconstruct", is_flag=True, help="Do not refit the layers by least squares after each step."
)
@click.option(
    "--select",
    type=click.Choice(SELECTIONS),
    default="magnitude",
    show_default=True,
    help="Which weights a layer loses: smallest |w|, or OBS saliency on the reconstruction's equations.",
)
@click.option(
    "--layer-cap",
    type=float,
    default=0.98,
    show_default=True,
    help="Largest sparsity of a layer that every path to the outputs goes through.",
)
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Order among weights of equal magnitude; the --holdout split.",
)
@_stats_option
@click.option(
    "--finetune",
    "finetune_spec",
    help="module:function (or file.py:function) called after every step with (model, masks); "
    "returns the retrained model or new tensor values.",
)
@click.option(
    "--torch-model",
    help="module:factory (or file.py:factory) returning the torch.nn.Module behind MODEL; finetunes "
    "it on --train between steps (needs the torch extra).",
)
@click.option(
    "--train",
    "train_path",
    type=click.Path(path_type=Path),
    help="Training data (.npz with labels) for --torch-model.",
)
@click.option("--epochs", type=int, default=1, show_default=True, help="Epochs per step for --torch-model.")
@click.option(
    "--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate for --torch-model."
)
@click.option("--no-surgery", is_flag=True, help="Only zero weights; keep the graph as it is.")
@click.option(
    "--merge-tolerance",
    type=float,
    default=0.0,
    show_default=True,
    help="Apply a merge that is not exact when its relative output error on the calibration data is at most "
    "this; 0 applies exact rewrites only.",
)
@click.option("--no-latency", is_flag=True, help="Skip the onnxruntime latency measurement.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    help="Draw entropy, kept weights and the loop into this PNG (needs matplotlib).",
)
@click.option(
    "--external-data",
    is_flag=True,
    help="Write the weights to OUT.data beside OUT (automatic when the model would not fit one protobuf).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def compress_command(
    model: Path,
    calib: Path,
    batch_size: int,
    workers: int,
    mean: str,
    std: str,
    output: Path,
    sparsity: float,
    step: float,
    method: str,
    eval_path: Path | None,
    holdout: float | None,
    min_agreement: float | None,
    max_rel_error: float | None,
    no_guard: bool,
    no_reconstruct: bool,
    select: str,
    layer_cap: float,
    report_path: Path | None,
    seed: int,
    stats_paths: tuple[Path, ...],
    finetune_spec: str | None,
    torch_model: str | None,
    train_path: Path | None,
    epochs: int,
    lr: float,
    no_surgery: bool,
    merge_tolerance: float,
    no_latency: bool,
    plot_path: Path | None,
    external_data: bool,
    quiet: bool,
    force: bool,
) -> None:
    """Prune MODEL with Entropy-Guided Pruning, reduce its depth, and write it to OUTPUT."""

    def action() -> None:
        Settings(
            sparsity=sparsity,
            step=step,
            method=method,
            batch_size=batch_size,
            seed=seed,
            merge_tolerance=merge_tolerance,
            holdout=holdout,
            min_agreement=min_agreement,
            max_rel_error=max_rel_error,
            select=select,
            layer_cap=layer_cap,
        ).check()
        _check_data_options(batch_size, workers, mean, std)
        if epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {epochs}")
        check_positive("--lr", lr)
        reads = [
            *model_inputs(model),
            *_reads(
                ("--calib", calib),
                ("--eval", eval_path),
                ("--train", train_path),
                *(("--stats", p) for p in stats_paths),
                ("--finetune", source_file(finetune_spec)),
                ("--torch-model", source_file(torch_model)),
            ),
        ]
        data_file = external_data_path(output)
        plan = plan_outputs(
            [output, data_file if external_data else None, report_path, plot_path],
            reads,
            force,
            possible=[] if external_data else [data_file],
        )
        plot_type = None if plot_path is None else plot_format(plot_path)  # matplotlib is there
        finetune = _finetune_callback(finetune_spec, torch_model, train_path, epochs, lr)
        progress = _StderrProgress(sys.stderr.isatty() and not quiet)
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
            eval_data=eval_path,
            holdout=holdout,
            min_agreement=min_agreement,
            guard=not no_guard,
            reconstruct=not no_reconstruct,
            select=select,
            layer_cap=layer_cap,
            stats=stats_paths,
            finetune=finetune,
            max_rel_error=max_rel_error,
            latency=not no_latency,
            workers=workers,
            mean=_floats(mean),
            std=_floats(std),
            progress=progress,
        )
        progress.close()
        with OutputWriter(plan) as writer:  # every output written, then all committed together
            writer.write_model(result.model, output, external=True if external_data else None)
            if report_path is not None:
                writer.write_bytes(report_path, to_json(result.report).encode("utf-8"))
            if plot_path is not None and plot_type is not None:
                writer.write_bytes(plot_path, render_plot(result.report, plot_type))
            writer.commit()
        if quiet:
            return
        click.echo(compression_table(result.report))
        click.echo()
        click.echo(op_table(result.report.model))
        click.echo()
        click.echo(steps_table(result.report))
        click.echo()
        written = [str(p) for p in (output, report_path, plot_path) if p is not None]
        click.echo(compression_summary(result.report, written))

    _run(action, quiet=quiet)


@main.command("verify")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("compressed", type=click.Path(path_type=Path))
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help="Inputs to run both models on (any --calib format).",
)
@click.option("--atol", type=float, default=1e-5, show_default=True, help="Absolute tolerance per element.")
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="Relative tolerance per element.")
@click.option(
    "--min-agreement", type=float, help="Pass on top-1 agreement at least this instead of element tolerances."
)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Samples per onnxruntime call.")
def verify_command(
    original: Path,
    compressed: Path,
    data: Path,
    atol: float,
    rtol: float,
    min_agreement: float | None,
    batch_size: int,
) -> None:
    """Compare COMPRESSED with ORIGINAL on --data; exit 0 when it passes, 1 when it does not.

    Without --min-agreement every output must satisfy |c - o| <= atol + rtol |o| everywhere
    (as Polygraphy checks); with it, the top-1 agreement of the first output decides.
    """

    def action() -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        check_tolerances(atol, rtol, min_agreement)
        reference, candidate = load_model(original), load_model(compressed)
        fidelity = compare(reference, candidate, open_calibration(data, reference), batch_size, atol, rtol)
        rows = list(outputs_table_rows(fidelity))
        click.echo(format_table(["output", "rel_error", "max_abs_error", "allclose"], rows))
        agreement = fidelity.top1_agreement
        click.echo(
            f"\n{fidelity.samples} samples; top-1 agreement "
            + ("-" if agreement is None else f"{agreement:.4f}")
        )
        if min_agreement is not None:
            problems = guard_problems(fidelity, min_agreement, None)
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

    _run(action)
