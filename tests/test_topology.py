from __future__ import annotations

import onnx
from models import conv_bn_relu, gemm_head, no_rectifier, residual_block, single_conv

from egp_onnx.io import load_model, prepare_model
from egp_onnx.topology import count_parameters, find_rectifiers, prunable_layers


def owners(model: onnx.ModelProto) -> dict[str, str | None]:
    return {s.name: (s.owner.name if s.owner else None) for s in find_rectifiers(prepare_model(model))}


def test_single_conv_owner(rng):
    assert owners(single_conv(rng)) == {"relu": "conv"}


def test_owner_through_batchnorm_and_constant_mul(rng):
    assert owners(conv_bn_relu(rng)) == {"relu": "conv"}


def test_residual_add_owner_is_deeper_branch_not_projection(rng):
    assert owners(residual_block(rng)) == {"relu0": "conv0", "relu1": "conv1", "relu2": "conv2"}


def test_gemm_and_matmul_owners_and_channel_axis(rng):
    sites = {s.name: s for s in find_rectifiers(prepare_model(gemm_head(rng)))}
    assert sites["fc1.relu"].owner.name == "fc1" and sites["fc1.relu"].owner.out_channels == 6
    assert sites["fc2.relu"].owner.name == "fc2" and sites["fc2.relu"].owner.out_channels == 5
    assert sites["fc2.relu"].channel_last
    assert not sites["relu0"].channel_last


def test_sample_model_ownership():
    from conftest import SAMPLES

    model = load_model(SAMPLES / "digits_resnet.onnx")
    layers = prunable_layers(find_rectifiers(model))
    assert sorted(layers) == sorted(
        [
            "stem.conv",
            "block1.conv1",
            "block1.conv2",
            "block2.conv1",
            "block2.conv2",
            "block3.conv1",
            "block3.conv2",
            "fc1",
        ]
    )
    assert "block2.down.0" not in layers and "fc2" not in layers, "shortcut and classifier stay dense"


def test_no_rectifier_means_nothing_prunable(rng):
    assert prunable_layers(find_rectifiers(prepare_model(no_rectifier(rng)))) == {}


def test_count_parameters(rng):
    total, nonzero = count_parameters(single_conv(rng))
    assert total == 4 * 3 * 3 * 3 + 4
    assert nonzero == total
