"""Running a command: progress on stderr, and every error mapped to one line and an exit code."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from egp_onnx.cli.files import committed
from egp_onnx.errors import INTERNAL_ERROR_EXIT, EgpError, one_line


class StderrProgress:
    """Stage lines and a running sample count on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.text = ""
        self.samples = 0

    def stage(self, text: str) -> None:
        """Start a new line for ``text``."""
        if self.enabled:
            if self.text:
                click.echo(err=True)
            self.text, self.samples = text, 0
            click.echo(f"\r{text} ...", nl=False, err=True)

    def advance(self, samples: int) -> None:
        """Count ``samples`` more on the stage's line."""
        if self.enabled:
            self.samples += samples
            click.echo(f"\r{self.text} ... {self.samples} samples", nl=False, err=True)

    def close(self) -> None:
        """End the last stage's line."""
        if self.enabled and self.text:
            click.echo(err=True)


def _log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, *args: Any, **kwargs: Any
) -> None:
    """Python warnings as one log line (they obey --quiet like every other warning)."""
    logging.getLogger("egp_onnx").warning("%s: %s", category.__name__, one_line(Exception(str(message))))


def _debug() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


def run(action: Callable[[], None], quiet: bool = False) -> None:
    """Run a command: whatever goes wrong becomes one line on stderr and a documented exit code.

    EgpError: its exit code (2, or 1 for a failed guard); an interrupt (SIGINT): 130; SIGTERM:
    143 (128 + 15, as a shell reports a process the signal ended); anything else is a defect of
    egp-onnx: exit code 3. `egp-onnx --debug` prints the trace as well. An interrupt or a
    termination unwinds like an error, so staged outputs are removed and nothing is written; one
    that lands after the outputs were committed (while the summary prints) names them instead.
    """
    written: list[Path] = []
    token = committed.set(written)
    try:
        with warnings.catch_warnings(), _quiet(quiet), _terminate_as_interrupt():
            warnings.showwarning = _log_warning
            action()
    except EgpError as exc:
        if _debug():
            traceback.print_exc()
        click.echo(f"egp-onnx: {exc.label}: {one_line(exc, limit=2000)}", err=True)
        sys.exit(exc.exit_code)
    except Terminated:
        click.echo(f"egp-onnx: terminated; {_what_was_written(written)}", err=True)
        sys.exit(TERMINATED_EXIT)
    except KeyboardInterrupt:
        click.echo(f"egp-onnx: interrupted; {_what_was_written(written)}", err=True)
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
    finally:
        committed.reset(token)


def _what_was_written(written: list[Path]) -> str:
    """The end of an interrupt's line: nothing was written, or what was, in full."""
    if not written:
        return "nothing was written"
    return "the outputs were already written: " + ", ".join(str(p) for p in written)


#: The exit code of a run ended by SIGTERM.
TERMINATED_EXIT = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived: unwinds the run like KeyboardInterrupt does (a BaseException, not an error)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises Terminated while the block runs (in the main thread; elsewhere it is left be)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
