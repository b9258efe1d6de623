"""A client like RapidOCR's direction classifier end to end: MobileNetV3-style, metadata, dynamic H/W."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from cli_checks import compress_args
from click.testing import CliRunner
from models import f32, mobilenet_v3
from onnx import numpy_helper
from references import reference_activations, run_ort

from egp_onnx.cli.main import main
from egp_onnx.graph.weights import count_parameters


def _fit_head(model: onnx.ModelProto, x: np.ndarray, kinds: np.ndarray) -> onnx.ModelProto:
    """``model`` with its head's weights fitted by least squares to score each input's kind."""
    features = reference_activations(model, ["flatten"], {"x": x})["flatten"].astype(np.float64)
    design = np.hstack([features, np.ones((len(x), 1))])
    targets = np.eye(4)[kinds] * 8.0
    solution = np.linalg.lstsq(design, targets, rcond=None)[0]
    fitted = {"head.w": solution[:-1].T, "head.b": solution[-1]}
    for tensor in model.graph.initializer:
        if tensor.name in fitted:
            tensor.CopyFrom(numpy_helper.from_array(f32(fitted[tensor.name]), tensor.name))
    return model


def test_a_mobilenet_v3_client_compressed_with_nothing_but_calib(rng, tmp_path):
    # inputs of four kinds (a pattern each, plus noise), and a head fitted to tell them apart: a
    # classifier with margins, as a trained one has (a random head's are ties)
    patterns = rng.normal(size=(4, 3, 12, 16))
    kinds = rng.integers(0, 4, 6 * 32)
    x = f32(patterns[kinds] + rng.normal(size=(len(kinds), 3, 12, 16)) * 0.5)
    model = _fit_head(mobilenet_v3(rng), x, kinds)
    source, calib = tmp_path / "cls.onnx", tmp_path / "calib"
    onnx.save(model, source)
    calib.mkdir()
    for i in range(6):  # recorded batches, as a client's wrapper saves them (one shape for now)
        np.save(calib / f"{i}.npy", x[i * 32 : (i + 1) * 32])
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(main, compress_args(source, calib, out, "--report", str(report_path)))
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["model"]["sparsity"] > 0.3
    # the emptied squeeze-excitation branch is the per-channel scale it computes, not a zero conv
    assert any(r["kind"] == "fold_gate" and r["applied"] for r in report["surgery"]["rewrites"])
    compressed = onnx.load(out)
    onnx.checker.check_model(compressed, full_check=True)
    # the reader's metadata, and everything else the file carried
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map["character"].splitlines() == ["0", "90", "180", "270"]
    assert (meta.description, meta.producer_name) == ("direction classifier", "paddle2onnx")
    assert [i.name for i in compressed.graph.input] == ["x"]
    assert [o.name for o in compressed.graph.output] == ["y"]
    # surgery never grows the model
    assert count_parameters(compressed)[0] <= count_parameters(model)[0]
    assert report["cost"]["after"]["params"] <= report["cost"]["before"]["params"]
    # the guard held on the held-out split; the model still takes any H and W
    assert report["fidelity"]["top1_agreement"] >= 0.99
    for shape in ((3, 3, 12, 16), (2, 3, 20, 9)):
        x = f32(rng.normal(size=shape))
        want, got = run_ort(model, {"x": x})[0], run_ort(compressed, {"x": x})[0]
        assert got.shape == want.shape == (shape[0], 4)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
