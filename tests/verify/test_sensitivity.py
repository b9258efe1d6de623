"""The per-layer sensitivity caps: what they cap, and when they are measured."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import compress_plain
from onnx import TensorProto, helper, numpy_helper

import egp_onnx.api.compress as compress_module
from egp_onnx.load.calibration import open_calibration
from egp_onnx.report.render import compression_summary
from egp_onnx.verify.fidelity import Reference
from egp_onnx.verify.sensitivity import ENOUGH_SAMPLES, caps_wanted, sensitivity_caps


def _main_and_faint(rng: np.random.Generator) -> onnx.ModelProto:
    """logits = relu(x @ w1) @ main + x @ faint: emptying ``main`` moves the answers, ``faint`` none."""
    w1 = (rng.normal(size=(8, 16)) / np.sqrt(8)).astype(np.float32)
    main = (rng.normal(size=(16, 4)) / 4).astype(np.float32)
    faint = (1e-4 * rng.normal(size=(8, 4))).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="fc1.relu"),
        helper.make_node("Gemm", ["r", "main"], ["a"], name="main"),
        helper.make_node("Gemm", ["x", "faint"], ["b"], name="faint"),
        helper.make_node("Add", ["a", "b"], ["logits"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "main_and_faint", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (main, "main"), (faint, "faint"))],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(
    ("asked", "held", "wanted"),
    [
        (None, ENOUGH_SAMPLES - 1, True),
        (None, ENOUGH_SAMPLES, False),
        (True, 10 * ENOUGH_SAMPLES, True),
        (False, 10, False),
    ],
)
def test_caps_are_measured_by_default_only_on_few_held_out_samples(asked, held, wanted):
    assert caps_wanted(asked, held) is wanted


def test_a_layer_that_moves_the_outputs_is_capped_and_a_faint_one_is_not(rng, tmp_path):
    model = _main_and_faint(rng)
    np.savez(tmp_path / "held.npz", x=rng.normal(size=(300, 8)).astype(np.float32))
    reference = Reference(model, open_calibration(tmp_path / "held.npz", model), 64)
    assert reference.samples == 300
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    caps = {c.weight: c for c in sensitivity_caps(model, weights, {}, reference, 0.99, None)}
    assert caps["faint"].cap == 1.0  # emptied, the answers stay: no cap
    assert caps["main"].cap == 0.5  # every level moves the answers: the lowest level tried
    assert caps["main"].damage > 1.0  # emptied alone it takes more than the whole slack


@pytest.mark.parametrize(
    ("held", "asked", "measured"), [(400, None, True), (1000, None, False), (1000, True, True)]
)
def test_the_run_measures_the_caps_as_the_rule_says_and_reports_it(
    rng, tmp_path, monkeypatch, held, asked, measured
):
    calls = []
    real = compress_module.sensitivity_caps
    monkeypatch.setattr(compress_module, "sensitivity_caps", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = tmp_path / "m.onnx"
    onnx.save(_main_and_faint(rng), path)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(200, 8)).astype(np.float32))
    np.savez(tmp_path / "e.npz", x=rng.normal(size=(held, 8)).astype(np.float32))
    options = {} if asked is None else {"sensitivity": asked}
    result = compress_plain(
        str(path), str(tmp_path / "c.npz"), eval_data=str(tmp_path / "e.npz"), sparsity=0.5,
        min_agreement=0.9, **options,
    )  # fmt: skip
    assert result.report.settings["sensitivity"] is measured
    assert bool(calls) is measured
    assert ("each layer capped" in compression_summary(result.report, [])) is measured
