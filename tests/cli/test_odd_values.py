"""NaN, extreme values and odd metadata (issue 24, class 6): a model whose outputs hold NaN at the
same places passes against itself, inputs near float32's range are refit or left as they are (never
an internal error), value_info that disagrees with the graph is repaired at load, and a batch that
onnxruntime rejects is our one line, with none of onnxruntime's own.

    x (N, 3, 6, 6) -> Conv -> Relu -> Conv -> Relu -> pre -> Sub 0.5 -> Sqrt -> y   (NaN where pre < 0.5)
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import onnx
import pytest
from cli_checks import SAMPLE, cli, compress_args
from models import inputs, save, two_convs
from onnx import TensorProto, helper, numpy_helper

from egp_onnx.cli.main import main


def _rename_output(model: onnx.ModelProto, to: str) -> str:
    """Let the node that wrote the graph output write ``to`` instead; returns the output's name."""
    name = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [to if o == name else o for o in node.output]
    return name


def nan_model(rng) -> onnx.ModelProto:
    model = two_convs(rng)
    name = _rename_output(model, "pre")
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    model.graph.node.extend(
        [helper.make_node("Sub", ["pre", "half"], ["shifted"]), helper.make_node("Sqrt", ["shifted"], [name])]
    )
    return model


def test_nan_outputs_at_the_same_places_are_no_difference(runner, caplog, tmp_path, rng, run_ort):
    model = nan_model(rng)
    path, calib = save(model, tmp_path / "m.onnx"), str(tmp_path / "c.npz")
    np.savez(calib, x=inputs(rng, 20))
    assert np.isnan(run_ort(model, {"x": inputs(rng)})[0]).any()
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    args = compress_args(path, calib, out, "--sparsity", "0", "--no-latency", "--report", str(report))
    with caplog.at_level(logging.WARNING, logger="egp_onnx"):
        result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert not caplog.records, (
        caplog.text
    )  # was: ERROR: graph surgery changed output y by up to 0 (nan relative)
    written = json.loads(report.read_text())
    assert written["fidelity"]["rel_error"] == 0.0 and not written["surgery"]["reverted"]
    for other in (path, str(out)):
        verdict = runner.invoke(main, ["verify", path, other, "--data", calib])
        assert verdict.exit_code == 0 and "PASS" in verdict.output, verdict.output
    # the same model with its NaNs moved (Sqrt of pre - 0.25) differs
    moved = nan_model(np.random.default_rng(0))
    shifted = onnx.ModelProto()
    shifted.CopyFrom(moved)
    for tensor in shifted.graph.initializer:
        if tensor.name == "half":
            tensor.CopyFrom(numpy_helper.from_array(np.array(0.25, np.float32), "half"))
    verdict = runner.invoke(
        main,
        ["verify", save(moved, tmp_path / "a.onnx"), save(shifted, tmp_path / "b.onnx"), "--data", calib],
    )
    assert verdict.exit_code == 1 and "FAIL" in verdict.output


def test_inputs_near_the_float32_range_are_no_internal_error(tmp_path):
    calib = dict(np.load(SAMPLE.parent / "digits_calib.npz"))
    calib["input"] = (calib["input"] * 1e30).astype(np.float32)  # finite, the products are not
    np.savez(tmp_path / "huge.npz", **calib)
    report = tmp_path / "r.json"
    args = compress_args(
        SAMPLE, tmp_path / "huge.npz", tmp_path / "o.onnx", "--sparsity", "0.5", "--no-latency"
    )
    result = cli(*args, "--report", str(report))  # was: internal error: LinAlgError: SVD did not converge
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr
    fits = {
        fit["status"] for step in json.loads(report.read_text())["steps"] for fit in step["reconstructed"]
    }
    assert "not refit: its normal equations overflow (activations too large)" in fits
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)


@pytest.mark.parametrize(
    ("tensor", "elem", "shape"),
    [
        ("z", TensorProto.FLOAT, ["N", 5, 6, 6]),  # 4 channels in the graph
        ("h", TensorProto.FLOAT, ["N", 5, 6, 6]),
        ("z", TensorProto.FLOAT, ["N", 4]),  # another rank
        ("h", TensorProto.INT64, ["N", 4, 6, 6]),  # another type
        ("z2", TensorProto.FLOAT16, None),
    ],
)
def test_value_info_that_disagrees_with_the_graph_is_repaired(tmp_path, rng, runner, tensor, elem, shape):
    model = two_convs(rng)
    model.graph.value_info.append(helper.make_tensor_value_info(tensor, elem, shape))
    path = save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=inputs(rng, 20))
    report = tmp_path / "r.json"
    args = compress_args(path, tmp_path / "c.npz", tmp_path / "o.onnx", "--sparsity", "0", "--no-latency")
    result = runner.invoke(main, [*args, "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["fidelity"]["rel_error"] < 1e-5
    assert onnx.load(path) == model  # the input is never modified


def test_a_batch_onnxruntime_rejects_is_our_line_only(tmp_path, rng):
    """A Reshape to (5, -1) fails on 7 samples: onnxruntime's coloured log line must not leak."""
    model = two_convs(rng)
    name = _rename_output(model, "pre")
    model.graph.initializer.append(numpy_helper.from_array(np.array([5, -1], np.int64), "shape"))
    model.graph.node.extend(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("Identity", ["pre"], [name])]
    )
    model.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, [5, None]))
    path = save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=inputs(rng, 7))
    result = cli(*compress_args(path, tmp_path / "c.npz", tmp_path / "o.onnx", "--no-latency"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    # the message names the batch's shapes (samples of many sizes: which size failed)
    assert re.match(r"egp-onnx: error: onnxruntime rejected a batch \(x \(\d+, 3, 6, 6\)\): ", lines[0])
    assert "\x1b[" not in result.stderr and "[E:onnxruntime" not in result.stderr
