"""Paths (issue 24, class 5): an output name up to the file system's limit is written (its
temporary never passes the limit), one past it is a one-line refusal, and an external-data file
linked beside the model is read, while a location that leaves the model's folder is not.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from cli_checks import compress_args, digests, one_line_error
from models import inputs, save_external, toy_files, two_convs

from egp_onnx.cli.main import main
from egp_onnx.load.model import name_max


@pytest.mark.parametrize("extra", [242, 250, 255])
def test_an_output_name_up_to_the_limit_is_written(runner, tmp_path, rng, extra):
    model, calib = toy_files(tmp_path, rng)
    limit = name_max(tmp_path)
    out = tmp_path / ("a" * (min(extra, limit) - len(".onnx")) + ".onnx")
    result = runner.invoke(main, compress_args(model, calib, out, "--sparsity", "0", "--no-latency"))
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(out))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_an_output_name_past_the_limit_is_one_line(runner, tmp_path, rng):
    model, calib = toy_files(tmp_path, rng)
    limit = name_max(tmp_path)
    before = digests(tmp_path)
    for command in (
        compress_args(model, calib, tmp_path / ("b" * limit + ".onnx")),
        compress_args(model, calib, tmp_path / "o.onnx", "--report", str(tmp_path / ("r" * (limit + 1)))),
        ["stats", model, "--calib", calib, "-o", str(tmp_path / ("s" * (limit + 1)))],
    ):
        line = one_line_error(runner.invoke(main, command))
        assert f"bytes long; the file system allows {limit}" in line, line
    assert digests(tmp_path) == before


def test_external_data_linked_beside_the_model_is_read(runner, tmp_path, rng):
    elsewhere, beside = tmp_path / "store", tmp_path / "models"
    elsewhere.mkdir()
    beside.mkdir()
    model = two_convs(rng)
    save_external(model, elsewhere / "m.onnx", "w.bin")
    shutil.move(elsewhere / "m.onnx", beside / "m.onnx")
    os.symlink(elsewhere / "w.bin", beside / "w.bin")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=inputs(rng))
    before = digests(tmp_path)
    result = runner.invoke(main, ["analyze", str(beside / "m.onnx"), "--calib", str(calib)])
    assert result.exit_code == 0, result.output
    assert "2 prunable rectifiers" in result.output
    # -o onto the linked file is writing onto an input: refused through the link
    args = compress_args(beside / "m.onnx", calib, elsewhere / "w.bin", "--force")
    assert "is the input file of the external data of MODEL" in one_line_error(runner.invoke(main, args))
    assert digests(tmp_path) == before


@pytest.mark.parametrize("location", ["../w.bin", "sub/../../w.bin"])
def test_external_data_outside_the_model_folder_is_refused(runner, tmp_path, rng, location):
    (tmp_path / "m").mkdir()
    model = save_external(two_convs(rng), tmp_path / "m" / "m.onnx", "w.bin")
    loaded = onnx.load(model, load_external_data=False)
    shutil.move(tmp_path / "m" / "w.bin", tmp_path / "w.bin")
    for tensor in loaded.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(loaded, model)
    line = one_line_error(runner.invoke(main, ["analyze", model, "--calib", str(tmp_path / "w.bin")]))
    assert f"keeps its data at {location!r}, outside the model's folder" in line
