"""Command line: `egp-onnx analyze`, `stats`, `compress` and `verify` (bodies in :mod:`.commands`)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from egp_onnx import __version__
from egp_onnx.cli import commands
from egp_onnx.errors import one_line

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


for _command in (
    commands.analyze_command,
    commands.stats_command,
    commands.compress_command,
    commands.verify_command,
):
    main.add_command(_command)
