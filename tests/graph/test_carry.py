"""What a model carries besides its graph survives compress (graph/carry.py)."""

from __future__ import annotations

import models
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

import egp_onnx
from egp_onnx.graph.carry import carry_model_fields

ALPHABET = "a\nb\nc\nd"


def _with_fields(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` dressed as a third-party file: the fields a downstream reader may depend on."""
    model.producer_name, model.producer_version = "paddle2onnx", "1.0.6"
    model.domain, model.model_version, model.doc_string = "ai.example", 7, "the recogniser"
    model.graph.name, model.graph.doc_string = "rec", "graph notes"
    helper.set_model_props(model, {"character": ALPHABET, "shape": "dynamic"})
    return model


def test_fields_come_back_on_an_exported_copy() -> None:
    """A copy that lost them (as gs.export_onnx loses them) gets them back; the result's extras stay."""
    original = _with_fields(models.residual_block(np.random.default_rng(0)))
    original.opset_import.add(domain="com.example", version=1)
    original.functions.append(helper.make_function("com.example", "Twice", ["x"], ["y"],
                                                   [helper.make_node("Add", ["x", "x"], ["y"])],
                                                   [helper.make_opsetid("", 17)]))  # fmt: skip
    stripped = helper.make_model(original.graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(stripped, {"shape": "theirs", "egp": "1"})
    outputs = list(stripped.graph.output)
    stripped.graph.output.extend([helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None)])
    stripped.graph.output[0].CopyFrom(outputs[0])
    original.graph.output.extend([helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None)])
    stripped.graph.output.reverse()  # the exporter lists the outputs in another order

    result = carry_model_fields(original, stripped)

    assert (result.producer_name, result.producer_version) == ("paddle2onnx", "1.0.6")
    assert (result.domain, result.model_version, result.doc_string) == ("ai.example", 7, "the recogniser")
    assert [(p.key, p.value) for p in result.metadata_props] == [
        ("character", ALPHABET), ("shape", "dynamic"), ("egp", "1"),
    ]  # fmt: skip
    assert {(o.domain, o.version) for o in result.opset_import} == {("", 18), ("com.example", 1)}
    assert [f.name for f in result.functions] == ["Twice"]
    assert (result.graph.name, result.graph.doc_string) == ("rec", "graph notes")
    assert [o.name for o in result.graph.output] == [o.name for o in original.graph.output] == ["y", "a"]


def test_a_reader_finds_its_alphabet_in_the_compressed_model(tmp_path, run_ort) -> None:
    """Compressed with surgery (which exports through graph-surgeon), the model keeps its metadata.

    The reader is onnxruntime's own metadata API, the one RapidOCR reads its alphabet through.
    """
    rng = np.random.default_rng(1)
    model = _with_fields(models.residual_block(rng))
    calib = tmp_path / "calib.npy"
    np.save(calib, models.inputs(rng, 64, (4, 6, 6)))
    result = egp_onnx.compress(model, calib, sparsity=0.6, guard=False, latency=False)
    assert any(r.applied for r in result.report.surgery.rewrites)  # the model went through the exporter
    path = tmp_path / "out.onnx"
    onnx.save(result.model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta()
    assert meta.custom_metadata_map["character"].splitlines() == ["a", "b", "c", "d"]
    assert (meta.producer_name, meta.domain, meta.version, meta.description) == (
        "paddle2onnx", "ai.example", 7, "the recogniser",
    )  # fmt: skip
    assert meta.graph_name == "rec"
    onnx.checker.check_model(result.model)
    x = models.inputs(rng, 4, (4, 6, 6))
    assert run_ort(path, {"x": x})[0].shape == run_ort(model, {"x": x})[0].shape
    assert model.metadata_props[0].value == ALPHABET  # the input is not modified
