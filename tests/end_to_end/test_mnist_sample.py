"""The MNIST sample: shipped files consistent with the model, accuracy measured, torch twin agrees.

The sample (sample_models/build_mnist_resnet.py) is a residual CNN:

    image (N,1,28,28) -> stem Conv BN Relu -> 3 stages x 2 basic blocks (Conv BN Relu Conv BN
    (+ shortcut) Relu) -> GlobalAveragePool Flatten Gemm Relu Gemm -> logits (N,10)
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, load_npz
from onnx import TensorProto
from references import run_ort

import egp_onnx

MODEL = SAMPLES / "mnist_resnet.onnx"
CALIB = SAMPLES / "mnist_calib.npz"
TEST = SAMPLES / "mnist_test.npz"
MEAN, STD = 0.1307, 0.3081  # the normalisation the build script documents


def test_mnist_model_is_valid_and_keeps_batchnorm():
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == ops.count("BatchNormalization") == 16  # stem, 12 block convs, 3 shortcuts
    assert ops.count("Add") == 6 and ops.count("Gemm") == 2 and ops.count("Relu") == 14
    (image,) = model.graph.input
    (logits,) = model.graph.output
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and image.type.tensor_type.elem_type == TensorProto.FLOAT
    assert isinstance(dims[0], str) and dims[1:] == [1, 28, 28]  # dynamic batch
    assert logits.name == "logits" and logits.type.tensor_type.shape.dim[1].dim_value == 10


@pytest.mark.parametrize("path", [CALIB, TEST], ids=["calib", "test"])
def test_mnist_data_files_match_the_model_input(path):
    data = load_npz(path)
    assert set(data) == {"image", "labels"}
    x, labels = data["image"], data["labels"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (len(x),)
    assert set(np.unique(labels)) == set(range(10))
    pixels = (x.astype(np.float64) * STD + MEAN) * 255  # undo the documented normalisation
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    assert path.stat().st_size < 5_000_000


def test_mnist_data_files_are_distinct_images():
    calib, test = load_npz(CALIB)["image"], load_npz(TEST)["image"]
    assert len(calib) == 2000
    keys = {x.tobytes() for x in calib}
    assert len(keys) == len(calib) and not keys & {x.tobytes() for x in test[:2000]}


def test_mnist_onnx_accuracy_on_the_shipped_test_set():
    data = load_npz(TEST)
    # optimised, as a user's session runs it: this measures the shipped file and is no reference
    # for egp-onnx's output, and its BatchNormalization nodes folded keep the 10,000 images quick
    (logits,) = run_ort(MODEL, {"image": data["image"]}, batch=500, optimize=True)
    assert logits.shape == (len(data["labels"]), 10)
    assert float((logits.argmax(1) == data["labels"]).mean()) >= 0.99


def test_mnist_torch_module_reproduces_onnx():
    pytest.importorskip("torch", reason="needs the optional torch extra: pip install 'egp-onnx[torch]'")
    import torch

    sys.path.insert(0, str(SAMPLES))
    from mnist_torch import factory

    x = load_npz(TEST)["image"][:64]
    with torch.no_grad():
        torch_logits = factory()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(torch_logits, run_ort(MODEL, {"image": x})[0], rtol=0, atol=1e-4)


def test_mnist_analyze_finds_the_prunable_layers():
    model = onnx.load(str(MODEL))
    report = egp_onnx.analyze(MODEL, CALIB, batch_size=500)
    assert report.samples == 2000
    relus = [n for n in model.graph.node if n.op_type == "Relu"]
    assert [r.rectifier for r in report.layers] == [n.name for n in relus]
    owners = {n.name: n.op_type for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    assert all(r.prunable and owners.get(r.name) == r.op_type for r in report.layers)
    assert report.layers[-1].op_type == "Gemm"  # the head's hidden layer

    # Independent reference: the ON fraction of the first rectifier, from its input in onnxruntime.
    first = relus[0].input[0]
    stem = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(["image"], [first])
    (z,) = run_ort(stem, {"image": load_npz(CALIB)["image"]}, [first])
    on = (z > 0).mean(axis=(0, 2, 3))
    assert report.layers[0].channels == z.shape[1]
    assert report.layers[0].on_fraction == pytest.approx(float(on.mean()), abs=1e-6)
    assert report.layers[0].always_off == int((on == 0).sum())
