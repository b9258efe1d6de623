"""Signals and leftovers (issue 24, class 7): SIGTERM unwinds a run like SIGINT (staged outputs
removed, exit 143), a later run removes the temporaries a killed run left of its outputs, and a
finetune callback that calls sys.exit() is an error, not a finished run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import onnx
import pytest
from cli_checks import cli, compress_args, digests, one_line_error
from conftest import ROOT
from models import toy_files

from egp_onnx.cli import commands, files
from egp_onnx.cli.main import main


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_while_outputs_are_staged_leaves_nothing(
    runner, tmp_path, rng, monkeypatch, sig, code, word
):
    model, calib = toy_files(tmp_path, rng)
    commit = files.OutputWriter.commit
    staged = []

    def signalled(self):
        staged.extend(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        # raise_signal runs the handler before it returns; os.kill may hand the signal to another
        # thread, and the main thread then meets it later, at times only after commit (flaky under load)
        signal.raise_signal(sig)  # while the model (external data: a staging folder) is staged
        return commit(self)

    monkeypatch.setattr(files.OutputWriter, "commit", signalled)
    before, handler = digests(tmp_path), signal.getsignal(signal.SIGTERM)
    args = compress_args(
        model, calib, tmp_path / "o.onnx", "--sparsity", "0", "--no-latency", "--external-data"
    )
    result = runner.invoke(main, [*args, "--report", str(tmp_path / "r.json")])
    assert staged, "the run staged nothing: the signal came at the wrong time"
    assert one_line_error(result, code) == f"egp-onnx: {word}; nothing was written"
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # no output, no temporary
    assert digests(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) == handler  # the run's handler lasts only while it runs


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_after_the_commit_names_what_was_written(
    runner, tmp_path, rng, monkeypatch, sig, code, word
):
    """Past the commit the outputs are in place: the line says so instead of "nothing was written"."""
    model, calib = toy_files(tmp_path, rng)
    summary = commands.compression_summary

    def signalled(*args, **kwargs):
        signal.raise_signal(sig)  # while the summary is being printed, after every output is committed
        return summary(*args, **kwargs)

    monkeypatch.setattr(commands, "compression_summary", signalled)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    args = compress_args(model, calib, out, "--sparsity", "0", "--no-latency")
    result = runner.invoke(main, [*args, "--report", str(report)])
    line = one_line_error(result, code)
    assert line == f"egp-onnx: {word}; the outputs were already written: {out}, {report}"
    onnx.checker.check_model(onnx.load(out))
    assert json.loads(report.read_text())["model"]["sparsity"] == 0.0  # the whole report, as committed
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path, rng):
    model, calib = toy_files(tmp_path, rng)
    out = tmp_path / "o.onnx"
    dead, alive = _dead_pid(), os.getpid()  # this test's process is alive while the CLI runs
    stale_dir = tmp_path / f".o.onnx.{dead}.k2j4x9qz.tmp"
    stale_dir.mkdir()
    (stale_dir / "o.onnx").write_bytes(b"partial model")
    stale_file = tmp_path / f".o.onnx.{dead}.a1b2c3d4.tmp"
    stale_file.write_bytes(b"partial")
    live = tmp_path / f".o.onnx.{alive}.zzzzzzzz.tmp"  # a run still at work on the same output
    live.write_bytes(b"in progress")
    other = tmp_path / f".other.onnx.{dead}.a1b2c3d4.tmp"  # another output's: not this run's business
    other.write_bytes(b"x")
    result = cli("-v", *compress_args(model, calib, out, "--sparsity", "0", "--no-latency"))
    assert result.returncode == 0, result.stderr
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and other.exists() and out.is_file()
    assert f"removed {stale_dir}, a temporary of an earlier run that did not finish" in result.stderr


def test_a_finetune_callback_that_exits_is_an_error(runner, tmp_path, rng):
    model, calib = toy_files(tmp_path, rng)
    (tmp_path / "hooks.py").write_text("import sys\ndef leave(model, masks):\n    sys.exit(0)\n")
    before = digests(tmp_path)
    hook = f"{tmp_path / 'hooks.py'}:leave"
    result = runner.invoke(main, compress_args(model, calib, tmp_path / "o.onnx", "--finetune", hook))
    line = one_line_error(result)
    assert (
        line == "egp-onnx: error: the finetune callback leave called sys.exit(0); return the tensors instead"
    )
    assert digests(tmp_path) == before


def test_sigterm_ends_a_real_run_with_143(tmp_path, rng):
    """The command line in its own process: a TERM during the run (here inside a finetune callback
    that waits) ends it with one line and exit 143, nothing written."""
    model, calib = toy_files(tmp_path, rng)
    marker = tmp_path / "started"
    (tmp_path / "hooks.py").write_text(
        f"import pathlib, time\ndef wait(model, masks):\n    pathlib.Path({str(marker)!r}).touch()\n"
        "    time.sleep(120)\n"
    )
    before = digests(tmp_path)
    args = compress_args(model, calib, tmp_path / "o.onnx", "--finetune", f"{tmp_path / 'hooks.py'}:wait")
    process = subprocess.Popen(
        [sys.executable, "-m", "egp_onnx", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the run never reached the callback"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143 and stderr.strip() == "egp-onnx: terminated; nothing was written", stderr
    marker.unlink()
    assert digests(tmp_path) == before
