"""`compress --quantize int8`: the written model keeps the pruned zeros, passes the checker, runs,
is judged by the guard (the float model is kept when it fails), and its report fits the schema."""

from __future__ import annotations

import json
import logging

import jsonschema
import numpy as np
import onnx
import pytest
from cli_checks import SAMPLE, SAMPLE_CALIB, compress_args, one_line_error
from click.testing import CliRunner
from conftest import REPORT_SCHEMA, SAMPLES, load_npz
from onnx import numpy_helper
from references import run_ort

import egp_onnx
from egp_onnx.cli.main import main
from egp_onnx.config import Settings
from egp_onnx.errors import ConfigError
from egp_onnx.graph.structure import depth
from egp_onnx.verify.cost import model_cost

EVAL = SAMPLES / "digits_test.npz"
LAYERS = ("Conv", "Gemm", "MatMul")


def dequantized(model: onnx.ModelProto, tensor: str) -> np.ndarray | None:
    """The values the DequantizeLinear that gives ``tensor`` produces, by the ONNX spec: (q - zp) * scale."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(
        (n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == tensor), None
    )
    if node is None:
        return None
    q = values[node.input[0]].astype(np.int64)
    scale, zero = values[node.input[1]].astype(np.float64), values[node.input[2]].astype(np.int64)
    if scale.ndim == 1 and q.ndim > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def test_the_written_int8_model_keeps_every_pruned_weight_at_zero(tmp_path):
    args = ("--sparsity", "0.6", "--step", "0.6", "--eval", str(EVAL), "--no-latency")
    runner = CliRunner()
    float_run = runner.invoke(main, compress_args(SAMPLE, SAMPLE_CALIB, tmp_path / "f.onnx", *args))
    assert float_run.exit_code == 0, float_run.output
    report = tmp_path / "r.json"
    int8_run = runner.invoke(
        main,
        compress_args(
            SAMPLE, SAMPLE_CALIB, tmp_path / "q.onnx", *args, "--quantize", "int8", "--report", str(report)
        ),
    )
    assert int8_run.exit_code == 0, int8_run.output
    assert "quantize    int8 (QDQ" in int8_run.output and "deflated (zlib 9)" in int8_run.output
    floats, quantized = onnx.load(tmp_path / "f.onnx"), onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(quantized, full_check=True)
    layers = {n.name: n for n in quantized.graph.node if n.op_type in LAYERS}
    weights = {t.name: numpy_helper.to_array(t) for t in floats.graph.initializer}
    zeros = 0
    for node in floats.graph.node:
        if node.op_type not in LAYERS or node.input[1] not in weights:
            continue
        w = weights[node.input[1]]
        match = layers.get(node.name) or layers[f"{node.name}/MatMulAddFusion"]
        values = dequantized(quantized, match.input[1])
        assert values is not None, f"{node.name}'s weight is not quantized"
        assert values.shape == w.shape
        assert np.all(values[w == 0] == 0.0), node.name  # exactly
        assert (
            np.all(values[w != 0] != 0.0) or np.abs(w[(w != 0) & (values == 0)]).max() < np.abs(w).max() / 254
        )
        zeros += int((w == 0).sum())
    assert zeros > 0
    data = json.loads(report.read_text())
    jsonschema.validate(data, REPORT_SCHEMA)
    record = data["quantization"]
    assert record["applied"] and record["reason"] is None and record["zero_weights_checked"] == zeros
    # the guard judged the quantized model: the report's fidelity is the INT8 model's, on --eval
    assert data["fidelity"]["top1_agreement"] == record["top1_agreement"] >= 0.99
    assert data["fidelity"]["data"] == "eval" and data["settings"]["quantize"] == "int8"
    # QDQ folds the ReLUs into the uint8 QuantizeLinear after them: the depth reported is the float graph's
    assert "Relu" not in {n.op_type for n in quantized.graph.node}
    float_depth = depth(floats)
    assert (data["model"]["depth_after"], data["model"]["nonlinear_depth_after"]) == (
        float_depth.layers,
        float_depth.nonlinear,
    )
    assert float_depth.nonlinear > 0
    test = load_npz(EVAL)
    (original,) = run_ort(SAMPLE, {"input": test["input"]})
    (int8,) = run_ort(tmp_path / "q.onnx", {"input": test["input"]}, optimize=True)
    assert (original.argmax(1) == int8.argmax(1)).mean() == pytest.approx(record["top1_agreement"])
    assert data["cost"]["after"]["deflate_bytes"] < data["cost"]["before"]["deflate_bytes"]
    # MACs and parameters are read through the DequantizeLinear of each weight: the float model's
    cost = model_cost(floats, {"input": (1, 1, 8, 8)})
    after = data["cost"]["after"]
    assert after["macs"] == cost.macs
    # a weight below half its channel's step rounds to 0 as well: a few MACs fewer, never more
    assert 0.99 * cost.nonzero_macs <= after["nonzero_macs"] <= cost.nonzero_macs
    assert data["cost"]["after"]["nonzero_params"] <= cost.nonzero_params + 2 * len(layers) * 64


def test_an_int8_model_that_fails_the_guard_is_not_written_the_float_one_is(caplog):
    options = {"sparsity": 0.0, "max_rel_error": 1e-4, "latency": False, "eval_data": EVAL}
    plain = egp_onnx.compress(SAMPLE, SAMPLE_CALIB, **options)
    with caplog.at_level(logging.WARNING, logger="egp_onnx"):
        result = egp_onnx.compress(SAMPLE, SAMPLE_CALIB, quantize="int8", **options)
    record = result.report.quantization
    assert record is not None and not record.applied
    reason = "the INT8 model fails the guard on the eval data: output logits: relative error "
    assert record.reason.startswith(reason)
    assert record.rel_error > 1e-4  # what the guard measured on the quantized model
    assert "keeping the float model" in caplog.text
    assert "QuantizeLinear" not in {n.op_type for n in result.model.graph.node}
    assert result.model.SerializeToString() == plain.model.SerializeToString()
    assert result.report.fidelity == plain.report.fidelity


def test_bad_quantize_values_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^--quantize must be one of int8, got 'int4'$"):
        Settings(quantize="int4").check()
    with pytest.raises(ConfigError, match="--quantize must be one of int8"):
        egp_onnx.compress(SAMPLE, SAMPLE_CALIB, quantize="uint8")
    for bad in ("int4", "INT 8", ""):
        result = CliRunner().invoke(
            main, compress_args(SAMPLE, SAMPLE_CALIB, tmp_path / "o.onnx", "--quantize", bad)
        )
        assert "--quantize" in one_line_error(result)
    assert list(tmp_path.iterdir()) == []


def test_channels_then_int8_leave_int8_its_share_and_write_an_int8_model_that_passes_the_guard():
    """On the digits sample the float stages alone ended where the INT8 model fails the guard (1 flip in
    256 held-out samples), and the float model was written; judged as they ship, they stop short of it.

    (Since whole residual branches go first, the loop's own result passes as INT8 here: the search
    again from a model known to pass, after a result that fails as it ships, is prune/test_loop.py's.)
    """
    result = egp_onnx.compress(SAMPLE, SAMPLE_CALIB, channels=True, quantize="int8", latency=False)
    report = result.report
    record = report.quantization
    assert record is not None and record.applied and record.reason is None
    assert report.channels is not None and report.channels.removed > 0
    assert record.top1_agreement is not None and record.top1_agreement >= 0.99
    assert report.fidelity.top1_agreement == record.top1_agreement
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    assert "QuantizeLinear" in {n.op_type for n in model.graph.node}
    # zeros stay zero: every weight that was 0.0 dequantizes to exactly 0.0 (checked by the stage,
    # counted here again on the written model's layers)
    zeros = 0
    for node in model.graph.node:
        if node.op_type in LAYERS:
            values = dequantized(model, node.input[1])
            assert values is not None, f"{node.name}'s weight is not quantized"
            zeros += int((values == 0).sum())
    assert zeros >= record.zero_weights_checked > 0
