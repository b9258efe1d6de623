"""LayerSet: the weights it reads, and the model copies it makes only when they changed."""

from __future__ import annotations

import numpy as np
from conftest import SAMPLES

from egp_onnx import reconstruct as rc
from egp_onnx.data import open_calibration
from egp_onnx.io import load_model
from egp_onnx.loop import LayerSet
from egp_onnx.prune import prune_smallest
from egp_onnx.topology import find_rectifiers, initializer_arrays, replace_initializers, tensor_values


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_apply_shares_the_model_it_read_and_copies_once_weights_change(rng):
    model = load_model(SAMPLES / "digits_resnet.onnx")
    original = tensor_values(model)
    layers = LayerSet(model, find_rectifiers(model))
    assert layers.apply(model) is model, "the weights are the model's own: no copy"
    other = replace_initializers(model, {})
    assert_same_tensors(tensor_values(layers.apply(other)), original)
    layers.weights = [prune_smallest(w, w.size // 2, rng) for w in layers.weights]
    pruned = layers.apply(model)
    assert pruned is not model
    values = tensor_values(pruned)
    for name, weight in zip(layers.weight_names, layers.weights, strict=True):
        np.testing.assert_array_equal(values[name], weight)
    assert_same_tensors(tensor_values(model), original)  # the model read from is untouched
    layers.read(pruned)
    assert layers.apply(pruned) is pruned


def test_reconstruct_given_the_model_itself_equals_given_a_copy():
    # the loop's first step now hands reconstruct the loaded model instead of a copy of it
    model = load_model(SAMPLES / "digits_resnet.onnx")
    calib = open_calibration(SAMPLES / "digits_calib.npz", model)
    names = ["block1.conv1.weight", "block2.conv2.weight", "fc1.weight"]
    weights = initializer_arrays(model, names)
    remove = {n: weights[n].size // 2 for n in names}
    copy = replace_initializers(model, weights)
    shared = rc.reconstruct(model, model, calib, 64, remove=remove, masked=names, seed=3)
    copied = rc.reconstruct(model, copy, calib, 64, remove=remove, masked=names, seed=3)
    assert_same_tensors(tensor_values(shared.model), tensor_values(copied.model))
    assert_same_tensors(tensor_values(model), tensor_values(copy))


def test_held_gives_the_weights_only_for_the_model_that_holds_them(rng):
    model = load_model(SAMPLES / "digits_resnet.onnx")
    layers = LayerSet(model, find_rectifiers(model))
    held = layers.held(model)
    assert list(held) == layers.weight_names
    assert all(held[n] is w for n, w in zip(layers.weight_names, layers.weights, strict=True))
    assert layers.held(replace_initializers(model, {})) == {}, "a copy is not known to hold them"
    layers.weights = [prune_smallest(w, w.size // 2, rng) for w in layers.weights]
    assert layers.held(model) == {}, "the weights changed"
    pruned = layers.apply(model)  # the model just written from the weights holds them
    values = tensor_values(pruned)
    for name, array in layers.held(pruned).items():
        np.testing.assert_array_equal(values[name], array)
        assert values[name].dtype == array.dtype


def test_nnz_is_counted_once_per_set_of_weights(rng, monkeypatch):
    model = load_model(SAMPLES / "digits_resnet.onnx")
    layers = LayerSet(model, find_rectifiers(model))
    counted = []
    real = np.count_nonzero
    monkeypatch.setattr(np, "count_nonzero", lambda a, *args, **kw: counted.append(1) or real(a, *args, **kw))
    first = layers.nnz()
    assert layers.nnz().tolist() == first.tolist() == [real(w) for w in layers.weights]
    assert len(counted) == len(layers.weights), "the second call counts nothing"
    first[0] = -1  # the caller's copy
    layers.weights = [prune_smallest(w, w.size // 2, rng) for w in layers.weights]
    assert layers.nnz().tolist() == [real(w) for w in layers.weights]
