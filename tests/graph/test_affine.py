"""Per-channel affine algebra: composing maps agrees with applying the ops to values."""

from __future__ import annotations

import numpy as np
import pytest

from egp_onnx.graph import affine


def test_per_channel_vectors():
    c = 3
    np.testing.assert_array_equal(affine.per_channel(np.array([[2.0]]), c, 3), [2.0, 2.0, 2.0])
    conv = np.arange(3.0).reshape(3, 1, 1)
    np.testing.assert_array_equal(affine.per_channel(conv, c, 3, rank=4), [0.0, 1.0, 2.0])
    assert affine.per_channel(conv, c, 1) is None  # channels on the wrong axis
    assert affine.per_channel(np.arange(3.0).reshape(1, 1, 1, 3, 1, 1), c, 3, rank=4) is None  # broadcasts up
    assert affine.per_channel(np.arange(3.0).reshape(1, 1, 1, 3, 1, 1), c, 3) is not None  # rank unknown
    assert affine.per_channel(np.arange(6.0), c, 1) is None
    assert affine.per_channel(np.arange(3.0), c, 3) is None


@pytest.mark.parametrize("op", affine.AFFINE_BINARY)
@pytest.mark.parametrize("first", [True, False])
def test_compose_binary_is_the_op_on_every_value(rng, op, first):
    scale, shift, k = rng.normal(size=4), rng.normal(size=4), rng.normal(size=4) + 3.0
    composed = affine.compose_binary(op, first, scale, shift, k)
    if op == "Div" and not first:
        assert composed is None  # k / x is not affine
        return
    assert composed is not None
    x = rng.normal(size=(5, 4))
    np.testing.assert_allclose(
        composed[0] * x + composed[1], affine.apply_binary(op, first, scale * x + shift, k)
    )
    assert affine.compose_binary("Div", True, scale, shift, np.zeros(4)) is None


def test_batchnorm_composes_as_it_computes(rng):
    gamma, beta, mean = rng.normal(size=(3, 4))
    var, eps = rng.random(4) + 0.1, 1e-5
    scale, shift = affine.compose_batchnorm(np.ones(4), np.zeros(4), gamma, beta, mean, var, eps)
    x = rng.normal(size=4)
    np.testing.assert_allclose(scale * x + shift, affine.batchnorm(x, gamma, beta, mean, var, eps))
    np.testing.assert_allclose(
        affine.batchnorm(x, gamma, beta, mean, var, eps), gamma * (x - mean) / np.sqrt(var + eps) + beta
    )
