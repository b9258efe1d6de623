"""load/model.py: onnx.checker's verdict on a model without serialising its weights; external data
files that are missing or outside the model's folder refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cli_checks import one_line_error
from models import gemm_head, inputs, residual_block, save_external, single_conv, two_convs
from onnx import helper

from egp_onnx.cli.main import main
from egp_onnx.graph.weights import split_weights
from egp_onnx.load.model import checked_split


@pytest.mark.parametrize("build", [single_conv, two_convs, residual_block, gemm_head])
def test_a_valid_model_passes_and_splits_as_split_weights(build, rng):
    model = build(rng)
    before = model.SerializeToString()
    stubbed, weights = checked_split(model)
    expected_stub, expected = split_weights(model)
    assert weights and weights.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array)
    assert stubbed == expected_stub
    assert model.SerializeToString() == before


def _weight(model: onnx.ModelProto) -> onnx.TensorProto:
    """single_conv's weight "w" (4x3x3x3 = 108 elements: split_weights takes it out)."""
    return next(t for t in model.graph.initializer if t.name == "w")


def short_raw_data(model: onnx.ModelProto) -> None:
    weight = _weight(model)
    weight.raw_data = weight.raw_data[:-4]


def two_value_fields(model: onnx.ModelProto) -> None:
    _weight(model).float_data.extend([1.0, 2.0])


def undefined_type(model: onnx.ModelProto) -> None:
    _weight(model).data_type = onnx.TensorProto.UNDEFINED


def unknown_op(model: onnx.ModelProto) -> None:
    model.graph.node[1].op_type = "NoSuchOp"


def undefined_input(model: onnx.ModelProto) -> None:
    model.graph.node[1].input[0] = "nobody_makes_this"


def wrong_attribute_type(model: onnx.ModelProto) -> None:
    conv = model.graph.node[0]
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("pads", 1.5))


@pytest.mark.parametrize(
    "damage",
    [short_raw_data, two_value_fields, undefined_type, unknown_op, undefined_input, wrong_attribute_type],
)
def test_what_the_checker_rejects_is_rejected(damage, rng):
    model = single_conv(rng)
    damage(model)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    with pytest.raises(onnx.checker.ValidationError):
        checked_split(model)


def test_an_initializer_that_is_also_an_input_stays_one_input(rng):
    """IR 3 models list their initializers among the inputs: no second input of the same name."""
    model = single_conv(rng)
    weight = _weight(model)
    model.graph.input.append(helper.make_tensor_value_info("w", weight.data_type, weight.dims))
    onnx.checker.check_model(model)
    stubbed, weights = checked_split(model)
    assert "w" in weights
    assert [i.name for i in stubbed.graph.input] == ["x", "w"]


def test_external_data_outside_or_missing_is_refused(runner, tmp_path, rng):
    model = two_convs(rng)
    np.savez(tmp_path / "c.npz", x=inputs(rng))
    (tmp_path / "m").mkdir()
    save_external(model, tmp_path / "m" / "gone.onnx", "gone.bin")
    (tmp_path / "m" / "gone.bin").unlink()
    outside = onnx.load(str(tmp_path / "m" / "gone.onnx"), load_external_data=False)
    for tensor in outside.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../c.npz"
    onnx.save(outside, str(tmp_path / "m" / "out.onnx"))
    c = ["--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o.onnx")]
    gone = one_line_error(runner.invoke(main, ["compress", str(tmp_path / "m" / "gone.onnx"), *c]))
    assert "external data file gone.bin of tensor 'w' not found beside the model" in gone
    far = one_line_error(runner.invoke(main, ["compress", str(tmp_path / "m" / "out.onnx"), *c]))
    assert "tensor 'w' keeps its data at '../c.npz', outside the model's folder" in far
