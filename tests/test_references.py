"""The suite's one onnxruntime runner (references.run_ort, the conftest fixture) against numpy."""

from __future__ import annotations

import numpy as np
from models import inputs, save_external, single_conv
from onnx import numpy_helper
from references import reference_activations


def conv_relu(model, x: np.ndarray) -> np.ndarray:
    """single_conv in numpy: a 3x3 convolution with padding 1, its bias, then max(0, .)."""
    w, b = (numpy_helper.to_array(t) for t in model.graph.initializer)  # "w" (4,3,3,3), then "b" (4,)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N,C,H,W,3,3
    z = np.einsum("nchwij,ocij->nohw", windows, w) + b[:, None, None]
    return np.maximum(z, 0)


def test_run_ort_computes_the_model_as_numpy_does_by_any_route(run_ort, rng, tmp_path):
    model = single_conv(rng)
    x = inputs(rng, n=7)
    want = conv_relu(model, x)
    (plain,) = run_ort(model, {"x": x})
    np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-5)
    path = save_external(model, tmp_path / "m.onnx", "m.onnx.data")
    for got in (
        run_ort(model, {"x": x}, batch=3)[0],  # chunks of 3, 3 and 1, concatenated
        run_ort(path, {"x": x})[0],  # from the file, its weights beside it
        run_ort(model, {"x": x}, optimize=True)[0],
    ):
        np.testing.assert_allclose(got, plain, rtol=1e-6, atol=1e-6)
    z = reference_activations(model, ["z"], {"x": x})["z"]
    np.testing.assert_allclose(np.maximum(z, 0), plain, rtol=0, atol=0)
