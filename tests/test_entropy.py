from __future__ import annotations

import numpy as np
import pytest

from egp_onnx.entropy import binary_entropy, constant_channels, layer_entropy, on_fraction


def test_binary_entropy_values():
    np.testing.assert_allclose(
        binary_entropy(np.array([0.5, 0.25, 0.75])), [1.0, 0.8112781244591328, 0.8112781244591328]
    )


def test_binary_entropy_clamp_at_extremes():
    # the reference clamps inside the log: h(0) = -(1) * log2(1) = 0, no NaN
    assert binary_entropy(np.array([0.0, 1.0])).tolist() == [0.0, 0.0]
    p = 1e-7
    assert binary_entropy(np.array([p]))[0] == pytest.approx(-p * np.log2(1e-5) - (1 - p) * np.log2(1 - p))


def test_layer_entropy_ignores_constant_channels():
    on = np.array([0, 10, 5, 2])
    h = layer_entropy(on, 10)
    assert h == pytest.approx(np.mean(binary_entropy(np.array([0.5, 0.2]))))


def test_layer_entropy_zero_when_all_constant():
    assert layer_entropy(np.array([0, 8, 8]), 8) == 0.0


def test_constant_channels_and_fraction():
    on, off = constant_channels(np.array([0, 3, 4]), 4)
    assert on.tolist() == [False, False, True]
    assert off.tolist() == [True, False, False]
    np.testing.assert_allclose(on_fraction(np.array([0, 3, 4]), 4), [0, 0.75, 1])
