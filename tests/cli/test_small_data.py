"""Small data and fixed batches (issue 24, class 4): the split fits the data and the model's fixed
batch size, the run says what it chose, and its messages name only what the user gave.

    x (N|B, 3, 6, 6) -> Conv -> Relu -> Conv -> Relu -> y     (two_convs; B a fixed batch size)
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from cli_checks import compress_args, digests, one_line_error
from models import inputs, save, two_convs

from egp_onnx.cli.main import main
from egp_onnx.errors import CalibrationError
from egp_onnx.load.calibration import holdout_count


def _files(tmp_path, rng, samples: int, batch: int | None):
    model = two_convs(rng)
    if batch is not None:
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_value = batch
    path = save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=inputs(rng, samples))
    return path, tmp_path / "c.npz"


@pytest.mark.parametrize(("samples", "batch"), [(1, None), (2, None), (3, None), (10, 8), (100, 64)])
def test_too_little_data_for_a_split_is_measured_on_the_calibration_data(
    runner, caplog, tmp_path, rng, samples, batch
):
    model, calib = _files(tmp_path, rng, samples, batch)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    with caplog.at_level(logging.INFO, logger="egp_onnx"):
        args = compress_args(model, calib, out, "--sparsity", "0", "--no-latency", "--report", str(report))
        result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "fidelity is measured on the calibration data itself (no holdout)" in caplog.text
    assert "--holdout" not in caplog.text + result.output  # the user gave none
    fidelity = json.loads(report.read_text())["fidelity"]
    used = samples if batch is None else samples // batch * batch
    assert (fidelity["data"], fidelity["samples"]) == ("calibration", used)
    assert fidelity["rel_error"] < 1e-5  # sparsity 0 keeps the outputs
    onnx.checker.check_model(str(out))


def test_a_fixed_batch_split_is_whole_batches(runner, caplog, tmp_path, rng):
    model, calib = _files(tmp_path, rng, 40, 8)
    report = tmp_path / "r.json"
    args = compress_args(model, calib, tmp_path / "o.onnx", "--sparsity", "0", "--no-latency")
    with caplog.at_level(logging.INFO, logger="egp_onnx"):
        result = runner.invoke(main, [*args, "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "16 samples held out and 24 for calibration, in batches of 8" in caplog.text
    assert "do not fill a batch" not in caplog.text
    fidelity = json.loads(report.read_text())["fidelity"]
    assert (fidelity["data"], fidelity["samples"]) == ("holdout", 16)


def test_an_explicit_holdout_below_one_fixed_batch_says_so(runner, tmp_path, rng):
    model, calib = _files(tmp_path, rng, 10, 8)
    before = digests(tmp_path)
    result = runner.invoke(main, compress_args(model, calib, tmp_path / "o.onnx", "--holdout", "0.5"))
    assert one_line_error(result) == (
        "egp-onnx: error: --holdout 0.5 of 10 samples leaves 5 held out and 5 for calibration; the model's "
        "batch size is fixed at 8, so both need at least 8 (--holdout 0 measures on the calibration data)"
    )
    assert digests(tmp_path) == before


def test_eval_with_holdout_zero_is_refused(runner, tmp_path, rng):
    model, calib = _files(tmp_path, rng, 10, None)
    before = digests(tmp_path)
    args = compress_args(model, calib, tmp_path / "o.onnx", "--eval", str(calib), "--holdout", "0")
    line = one_line_error(runner.invoke(main, args))
    assert line == "egp-onnx: error: give either --eval or --holdout, not both"
    assert digests(tmp_path) == before


def test_holdout_count():
    assert holdout_count(3, None) == 0 and holdout_count(4, None) == 2  # min(max(500, 1), 2)
    assert holdout_count(2000, None) == 500 and holdout_count(2000, None, 64) == 512
    assert holdout_count(100, None, 64) == 0 and holdout_count(128, None, 64) == 64
    assert holdout_count(1000, None, 8) == 496 and holdout_count(200, 0.25) == 50
    with pytest.raises(CalibrationError, match="both need at least one"):
        holdout_count(3, 0.1)
