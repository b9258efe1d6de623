"""Static INT8 quantization (runtime/quantize.py): pruned weights stay exactly 0, the model is valid
and runs, nothing is left behind in the temporary folder, the caller's model is untouched."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import pytest
from models import conv_bn_relu, gemm_head, inputs
from onnx import numpy_helper

from egp_onnx.errors import ModelError
from egp_onnx.runtime.quantize import quantize_int8, zeros_kept


def pruned(model: onnx.ModelProto, rng: np.random.Generator, fraction: float = 0.6) -> onnx.ModelProto:
    """``model`` with ``fraction`` of every weight of rank >= 2 set to exactly 0.0 (seeded positions)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        array = numpy_helper.to_array(tensor).copy()
        if array.ndim >= 2:
            array[rng.random(array.shape) < fraction] = 0.0
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return copy


def feeds(rng: np.random.Generator, batches: int = 4, shape=(3, 6, 6)):
    return [{"x": inputs(rng, 8, shape)} for _ in range(batches)]


def independent_dequantize(quantized: onnx.ModelProto, name: str) -> np.ndarray:
    """The float values DequantizeLinear gives for ``name``_quantized, computed here from the ONNX spec:
    y = (x - zero_point) * scale, per channel along axis 0 for weights."""
    values = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    q = values[f"{name}_quantized"].astype(np.int64)
    scale = values[f"{name}_scale"].astype(np.float64)
    zero = values[f"{name}_zero_point"].astype(np.int64)
    assert q.dtype == np.int64 and values[f"{name}_quantized"].dtype == np.int8
    shape = (-1,) + (1,) * (q.ndim - 1) if scale.ndim == 1 and scale.size == q.shape[0] else scale.shape
    axis_first = np.reshape(scale, shape), np.reshape(zero, shape)
    return (q - axis_first[1]) * axis_first[0]


def test_pruned_weights_dequantize_to_exactly_zero_and_the_model_runs(rng, run_ort):
    """
    x(N,3,6,6) -> Conv(3->4) -> Relu -> GAP -> Flatten -> Gemm(4->6, transB) -> Relu
      -> MatMul(6->5) -> Add -> Relu -> Gemm(5->3) -> y         (60% of each weight exactly 0)
    """
    model = pruned(gemm_head(rng), rng)
    before = model.SerializeToString()
    result = quantize_int8(model, feeds(rng))
    assert model.SerializeToString() == before  # the caller's model is not touched
    onnx.checker.check_model(result.model, full_check=True)
    ops = [n.op_type for n in result.model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert result.samples == 32
    zero_count = sum(int((numpy_helper.to_array(t) == 0).sum()) for t in model.graph.initializer)
    for tensor in model.graph.initializer:
        w = numpy_helper.to_array(tensor)
        if w.ndim < 2:
            continue
        if tensor.name == "w2":  # MatMul's weight (6, 5): per channel along its output axis 1
            continue
        dequantized = independent_dequantize(result.model, tensor.name)
        assert dequantized.shape == w.shape
        assert np.all(dequantized[w == 0] == 0.0), tensor.name  # exactly, not approximately
        # the zero point of every weight channel is 0: the scheme is symmetric
        assert not numpy_helper.to_array(
            next(t for t in result.model.graph.initializer if t.name == f"{tensor.name}_zero_point")
        ).any()
    assert result.zeros_checked == zero_count > 0  # every layer's weight, MatMul's too
    x = inputs(rng, 16)
    (expected,) = run_ort(model, {"x": x})
    (got,) = run_ort(result.model, {"x": x}, optimize=True)
    assert got.shape == expected.shape
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.1  # 8 bits, not identical


def test_zeros_are_checked_through_a_batchnorm_that_preprocessing_folds(rng, run_ort):
    """
    x -> Conv3x3(3->5) -> BatchNormalization -> Mul(const) -> Relu -> y   (BN folded by quant_pre_process)
    """
    model = pruned(conv_bn_relu(rng), rng)
    zeros = int((numpy_helper.to_array(model.graph.initializer[0]) == 0).sum())
    result = quantize_int8(model, feeds(rng))
    assert "BatchNormalization" not in {n.op_type for n in result.model.graph.node}
    assert result.zeros_checked == zeros > 0
    x = inputs(rng, 8)
    assert run_ort(result.model, {"x": x}, optimize=True)[0].shape == run_ort(model, {"x": x})[0].shape


def test_a_zero_moved_away_from_zero_is_a_defect(rng):
    model = pruned(gemm_head(rng), rng)
    result = quantize_int8(model, feeds(rng))
    broken = onnx.ModelProto()
    broken.CopyFrom(result.model)
    weight = next(t for t in broken.graph.initializer if t.name == "w0_quantized")
    q = numpy_helper.to_array(weight).copy()
    zero_at = np.argwhere(numpy_helper.to_array(model.graph.initializer[0]) == 0)[0]
    q[tuple(zero_at)] = 3
    weight.CopyFrom(numpy_helper.from_array(q, weight.name))
    with pytest.raises(ModelError, match=r"moved 1 pruned weights of conv0 \(w0\) away from 0"):
        zeros_kept(model, broken)


@pytest.mark.parametrize("fails", [False, True])
def test_the_temporary_folder_is_removed_whatever_happens(fails, rng, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = gemm_head(rng)
    batches = [{"image": inputs(rng, 8)}] if fails else feeds(rng)  # a feed for an input it lacks
    if fails:
        with pytest.raises(ModelError, match="onnxruntime cannot quantize the model to INT8: ") as info:
            quantize_int8(model, batches)
        assert "\n" not in str(info.value)
    else:
        quantize_int8(model, batches)
    assert list(tmp_path.iterdir()) == []
