"""How a run fails or keeps quiet (cli/run.py): one line on stderr with its exit code, no traceback,
nothing written; a missing optional extra is found before any work.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from cli_checks import cli, compress_args, digests, one_line_error
from click.testing import CliRunner
from conftest import ROOT
from models import inputs, save, toy_files, two_convs

from egp_onnx.cli.main import main


def test_missing_matplotlib_is_found_before_any_work(runner, tmp_path, rng, monkeypatch):
    model, calib = toy_files(tmp_path, rng)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError

    def no_work(*args, **kwargs):
        raise AssertionError("compress ran before the optional dependency was checked")

    monkeypatch.setattr("egp_onnx.cli.commands.compress", no_work)
    before = digests(tmp_path)
    args = compress_args(model, calib, tmp_path / "o.onnx", "--report", str(tmp_path / "r.json"))
    line = one_line_error(runner.invoke(main, [*args, "--plot", str(tmp_path / "p.png")]))
    assert line == "egp-onnx: error: --plot needs matplotlib: pip install 'egp-onnx[plot]'"
    assert digests(tmp_path) == before


def test_missing_torch_is_found_before_any_work(runner, tmp_path, rng, monkeypatch):
    model, calib = toy_files(tmp_path, rng)
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "egp_onnx.integrations.torch", None)
    monkeypatch.setattr(
        "egp_onnx.cli.commands.compress", lambda *a, **k: pytest.fail("compress ran without torch")
    )
    (tmp_path / "factory.py").write_text("def factory():\n    return None\n")
    before = digests(tmp_path)
    factory = f"{tmp_path / 'factory.py'}:factory"
    args = compress_args(model, calib, tmp_path / "o.onnx", "--torch-model", factory, "--train", calib)
    result = runner.invoke(main, args)
    assert "torch" in one_line_error(result)
    assert digests(tmp_path) == before


def test_missing_pillow_is_found_before_any_work(runner, tmp_path, rng, monkeypatch):
    from models import image_model

    model = save(image_model(rng), tmp_path / "m.onnx")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setattr("egp_onnx.api.compress.collect_statistics", lambda *a, **k: pytest.fail("calibrated"))
    before = digests(tmp_path)
    args = ["compress", model, "--calib", str(tmp_path / "images"), "-o", str(tmp_path / "o.onnx")]
    line = one_line_error(runner.invoke(main, args))
    assert line == "egp-onnx: error: reading images needs Pillow: pip install 'egp-onnx[images]'"
    assert digests(tmp_path) == before


def test_unexpected_errors_are_one_line_with_a_trace_on_demand(runner, tmp_path, rng, monkeypatch):
    model, calib = toy_files(tmp_path, rng)

    def defect(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("egp_onnx.cli.commands.compress", defect)
    args = ["compress", model, "--calib", calib, "-o", str(tmp_path / "o.onnx")]
    line = one_line_error(runner.invoke(main, args), exit_code=3)
    assert line.startswith("egp-onnx: internal error: ZeroDivisionError: division by zero")
    debug = runner.invoke(main, ["--debug", *args])
    assert debug.exit_code == 3 and "Traceback" in debug.stderr and "ZeroDivisionError" in debug.stderr


def test_a_closed_stdout_is_not_a_traceback(tmp_path, rng):
    """`egp-onnx analyze ... | head -1`: the reader goes away; no trace, no internal error."""
    model, calib = toy_files(tmp_path, rng)
    with subprocess.Popen(
        [sys.executable, "-m", "egp_onnx", "analyze", model, "--calib", calib],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as proc:
        proc.stdout.close()
        err = proc.stderr.read().decode()
    assert proc.returncode in (0, 1) and err == "", err


def test_quiet_prints_nothing_but_errors(tmp_path, rng):
    model = two_convs(rng)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # a fixed batch of 4: a warning
    save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=10))
    args = ["compress", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "--sparsity", "0.5"]
    args += ["--holdout", "0", "--no-guard"]  # all 10 samples calibrate
    loud = cli(*args, "-o", str(tmp_path / "a.onnx"))
    assert loud.returncode == 0 and loud.stdout, loud.stderr
    assert loud.stderr.startswith("egp-onnx: WARNING: ") and "2 of 10 samples" in loud.stderr
    quiet = cli(*args, "-o", str(tmp_path / "b.onnx"), "--quiet")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    again = cli(*args, "-o", str(tmp_path / "b.onnx"), "--quiet")
    assert again.returncode == 2 and again.stdout == ""
    assert (
        again.stderr
        == f"egp-onnx: error: output {tmp_path / 'b.onnx'} exists; pass --force to overwrite it\n"
    )


def test_quiet_prints_nothing(tmp_path, rng):
    model, calib = toy_files(tmp_path, rng)
    args = ["compress", model, "--calib", calib, "-o", str(tmp_path / "o.onnx"), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and result.output == ""
    assert (tmp_path / "o.onnx").exists()
