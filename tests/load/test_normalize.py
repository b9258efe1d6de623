"""Load-time normalisation and the statistics model on graphs as older exporters write them."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
from corpus import ir3_inputs, paddle_style, probe_names, subgraph_reads_outer
from references import run_ort

from egp_onnx.calibrate.probes import probe_prefix, statistics_model
from egp_onnx.graph.rectifiers import find_rectifiers
from egp_onnx.load.model import prepare_model
from egp_onnx.load.normalize import needs_folding


def test_folding_keeps_outputs(rng):
    original, _ = paddle_style(rng)
    model = prepare_model(original)
    assert needs_folding(original.graph) and not needs_folding(model.graph)
    x = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    want, got = (run_ort(m, {"x": x})[0] for m in (original, model))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_folding_failure_leaves_the_model_loadable(rng, monkeypatch, caplog):
    def broken(model):
        raise RuntimeError("cannot fold")

    monkeypatch.setattr("egp_onnx.surgery.fold.fold_constants", broken)
    with caplog.at_level(logging.WARNING):
        model = prepare_model(paddle_style(rng)[0])
    assert "constant folding skipped: cannot fold" in caplog.text
    assert any(n.op_type == "Constant" for n in model.graph.node)


def test_statistics_model_of_raw_ir3_model_needs_only_x(rng):
    """Without normalisation too: inputs naming dropped initializers are dropped with them."""
    model, _ = ir3_inputs(rng)
    inferred = onnx.shape_inference.infer_shapes(model)
    stats = statistics_model(inferred, find_rectifiers(inferred))
    # a session of its own, not run_ort: the test reads the inputs the session asks for
    session = ort.InferenceSession(stats.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]


def test_statistics_model_keeps_what_subgraphs_read(rng):
    model = prepare_model(subgraph_reads_outer(rng)[0])
    stats = statistics_model(model, find_rectifiers(model))
    names = {t.name for t in stats.graph.initializer}
    assert {"k", "m"} <= names
    # not run_ort: what is checked is that onnxruntime accepts the model, with no data to run
    ort.InferenceSession(stats.SerializeToString(), providers=["CPUExecutionProvider"])


def test_probe_prefix_is_unique(rng):
    model = prepare_model(probe_names(rng)[0])
    prefix = probe_prefix(model)
    assert prefix != "egp"
    stats = statistics_model(model, find_rectifiers(model))
    original = {t.name for t in model.graph.initializer} | {n.name for n in model.graph.node}
    added = [n.name for n in stats.graph.node if n.name not in original]
    assert added and all(n.startswith(prefix) for n in added)
    onnx.checker.check_model(stats)
