"""The corpus: graphs as real exporters write them must analyse, compress and stay valid.

For every model (see tests/corpus.py): analyze finds prunable layers; compress at sparsity 0
keeps the outputs within 1e-5 (relative L2) on fresh inputs that are not the calibration data;
at sparsity 0.5 the result passes onnx.checker (full check), runs in onnxruntime with finite
outputs and reports its depth. The big light-zoo models take 20-60 s each: they are marked
``slow`` and run with ``EGP_SLOW=1``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from corpus import (
    TORCH_NETS,
    accept,
    ir3_inputs,
    light_zoo,
    paddle_style,
    probe_names,
    subgraph_reads_outer,
    torch_net,
)

from egp_onnx.graph.rectifiers import find_rectifiers, prunable_layers
from egp_onnx.load.model import prepare_model

HAND_BUILT = {
    "paddle_style": paddle_style,
    "ir3_inputs": ir3_inputs,
    "subgraph_reads_outer": subgraph_reads_outer,
    "probe_names": probe_names,
}


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_exporter_habits(name, rng, tmp_path):
    model, shapes = HAND_BUILT[name](rng)
    accept(model, shapes, tmp_path, rng, fresh_samples=2)


def test_paddle_weights_become_initializers_and_activations_are_found(rng):
    model = prepare_model(paddle_style(rng)[0])
    assert not [n for n in model.graph.node if n.op_type in ("Constant", "Unsqueeze")]
    sites = {s.name: s for s in find_rectifiers(model)}
    assert (sites["relu6"].kind, sites["relu6"].owner.name) == ("relu6", "conv1")  # through BN as Mul/Add
    assert (sites["hs.mul"].op_type, sites["hs.mul"].owner.name) == ("HardSwish", "conv2")  # x*Clip(x+3)/6
    assert "hs.clip" not in sites, "the Clip inside a HardSwish is not a ReLU6"


def test_ir3_inputs_become_consistent(rng):
    original, _ = ir3_inputs(rng)
    model = prepare_model(original)
    assert [i.name for i in model.graph.input] == ["x"] and model.ir_version == 4
    assert len(model.graph.initializer) == 6
    onnx.checker.check_model(model, full_check=True)


LIGHT_FAST = ("squeezenet", "shufflenet")
LIGHT_SLOW = ("resnet50", "densenet121", "inception_v2")
#: Units that 8 calibration samples never turn ON (dense heads, LRN stems) but fresh samples do.
LIGHT_STATISTICAL = ("bvlc_alexnet", "zfnet512", "inception_v1", "vgg19")


@pytest.mark.parametrize("name", LIGHT_FAST)
def test_light_zoo(name, rng, tmp_path):
    model, shapes = light_zoo(name, rng)
    outcome = accept(model, shapes, tmp_path, rng)
    assert outcome.prunable == len(prunable_layers(find_rectifiers(prepare_model(model))))


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_SLOW)
def test_light_zoo_slow(name, rng, tmp_path):
    model, shapes = light_zoo(name, rng)
    accept(model, shapes, tmp_path, rng)


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_STATISTICAL)
def test_light_zoo_statistical(name, rng, tmp_path):
    model, shapes = light_zoo(name, rng)
    accept(model, shapes, tmp_path, rng, samples=4)


def test_light_zoo_ownership():
    """Owners through Sum (ResNet-50: all 49 ReLUs) and Concat + BN (DenseNet-121: 117 of 121;
    the first layer of each of the 4 dense blocks reads a pooling output, which no layer owns)."""
    for name, relus in (("resnet50", 49), ("densenet121", 117)):
        sites = find_rectifiers(prepare_model(light_zoo(name, np.random.default_rng(0))[0]))
        assert len({s.node for s in sites if s.owner is not None}) == relus


torch_missing = importlib.util.find_spec("torch") is None
onnxscript_missing = importlib.util.find_spec("onnxscript") is None


@pytest.mark.skipif(torch_missing, reason="needs the torch extra")
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("name", TORCH_NETS)
def test_torchscript_exports(name, rng, tmp_path):
    model, shapes = torch_net(name, dynamo=False, opset=17)
    accept(model, shapes, tmp_path, rng)


@pytest.mark.skipif(torch_missing, reason="needs the torch extra")
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["mobilenet_v3", "efficientnet"])
def test_torchscript_decomposed_activations(name, rng, tmp_path):
    """Opset 11: HardSwish is written x * HardSigmoid(x); SiLU is x * Sigmoid(x) at every opset."""
    model, shapes = torch_net(name, dynamo=False, opset=11)
    sites = find_rectifiers(prepare_model(model))
    kinds = [s.kind for s in sites if s.op_type in ("HardSwish", "SiLU")]
    assert kinds and set(kinds) == {"hardswish" if name == "mobilenet_v3" else "silu"}
    assert all(s.owner is not None for s in sites if s.kind)
    accept(model, shapes, tmp_path, rng)


@pytest.mark.skipif(torch_missing or onnxscript_missing, reason="needs torch and onnxscript")
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("name", ["densenet"])
def test_dynamo_exports(name, rng, tmp_path):
    model, shapes = torch_net(name, dynamo=True, opset=18)
    accept(model, shapes, tmp_path, rng)


@pytest.mark.slow
@pytest.mark.skipif(torch_missing or onnxscript_missing, reason="needs torch and onnxscript")
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3", "efficientnet", "yolo_c2f"])
def test_dynamo_exports_slow(name, rng, tmp_path):
    model, shapes = torch_net(name, dynamo=True, opset=18)
    accept(model, shapes, tmp_path, rng)
