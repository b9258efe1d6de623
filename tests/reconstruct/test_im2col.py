"""im2col rows and their grouping, against onnxruntime's convolution."""

from __future__ import annotations

import numpy as np
import pytest
from models import f32
from references import run_ort
from refit_models import CONVS, conv_model

from egp_onnx.graph.layers import linear_layers
from egp_onnx.graph.weights import initializer_arrays
from egp_onnx.reconstruct import im2col

TAKE = 64  # positions a sample, fewer than a 9x9 map's


@pytest.mark.parametrize("name", [*CONVS, "dilated"])
def test_conv_rows_reproduce_onnxruntime(rng, name):
    # The im2col rows times the weight columns are the convolution onnxruntime computes, at the
    # sampled positions, for every geometry the solver accepts (asymmetric pads included).
    config = CONVS.get(name, dict(cin=4, cout=6, k=3, stride=1, pad=2, group=1))
    model = conv_model(rng, **config, dilation=2 if name == "dilated" else 1)
    (layer,), skipped = linear_layers(model)
    assert not skipped and layer.groups == config["group"]
    x = f32(rng.normal(size=(3, config["cin"], 9, 9)))
    (y,) = run_ort(model, {"x": x})
    where = im2col.positions(y.shape, np.random.default_rng(0), TAKE)
    rows, target = im2col.conv_rows(x, layer, where), im2col.rows_of(y, where)
    arrays = initializer_arrays(model, ["conv.w", "conv.b"])
    columns = layer.kind.to_columns(layer, arrays["conv.w"])  # (groups, d, per)
    per = columns.shape[2]
    order = im2col.patch_order(layer, rows.shape[2])  # the rows' columns in the solver's order
    predicted = np.concatenate([rows[g][:, order] @ columns[g] for g in range(layer.groups)], axis=1)
    predicted += arrays["conv.b"]
    assert rows.shape[1] == len(target) == 3 * min(TAKE, y.shape[2] * y.shape[3])
    assert per * layer.groups == config["cout"]
    np.testing.assert_allclose(predicted, target, rtol=1e-4, atol=1e-4)


def test_groups_join_consecutive_batches_of_one_shape_up_to_the_limit():
    def batch(n, size=4):
        return (np.zeros((n, 2, size, size), np.float32), np.zeros((n, 3), np.float32))

    batches = [batch(4), batch(4), batch(4), batch(2, size=5), batch(4), batch(4)]
    per = batches[0][0].nbytes
    assert im2col.groups_of(batches, 2 * per) == [[0, 1], [2], [3], [4, 5]]
    assert im2col.groups_of(batches, 1) == [[i] for i in range(6)]
