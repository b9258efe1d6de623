"""Parts of calibration data for a cluster: each part's batches are the single pass's, in order."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from onnx import TensorProto, helper
from PIL import Image

from egp_onnx.load.calibration import InputSpec, in_memory, open_calibration
from egp_onnx.load.parts import DataPart, batch_parts, part_data, plan_parts, shard_layout


def relu_model(shape):
    """x(shape) -> Relu -> y: only its input's declaration matters here."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph)


def dynamic_model(symbolic_hw=False):
    return relu_model(("N", 2, "H", "W") if symbolic_hw else ("N", 2, 3, 3))


def fixed_model(batch, sample=(2, 3, 3)):
    return relu_model((batch or "N", *sample))


def batches_of(data, batch_size):
    return [(feed["x"], labels) for feed, labels in data.batches(batch_size)]


def part_batches(data, batch_size, part_samples):
    parts = plan_parts(data, batch_size, part_samples)
    key = uuid.uuid4().hex  # names these loaders in the process's cache of the last shard loaded
    found = []
    for part in parts:
        found += batches_of(part_data(data.loaders, key, data.specs, data.description, part), batch_size)
    return parts, found


def same_batches(a, b):
    assert len(a) == len(b)
    for (xa, la), (xb, lb) in zip(a, b, strict=True):
        assert xa.shape == xb.shape and np.array_equal(xa, xb)
        assert (la is None) == (lb is None) and (la is None or np.array_equal(la, lb))


@pytest.mark.parametrize("sizes", [[100], [7, 7, 7], [5, 13, 1, 30, 2], [64, 64], [3]])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
@pytest.mark.parametrize("part_samples", [1, 20, 256])
def test_parts_of_npz_files_give_the_single_pass_batches(tmp_path, rng, sizes, batch_size, part_samples):
    model = dynamic_model()
    for i, n in enumerate(sizes):
        x = rng.normal(size=(n, 2, 3, 3)).astype(np.float32)
        np.savez(tmp_path / f"{i:02d}.npz", x=x, labels=np.arange(n))
    data = open_calibration(tmp_path, model)
    whole = batches_of(open_calibration(tmp_path, model), batch_size)
    parts, found = part_batches(data, batch_size, part_samples)
    same_batches(whole, found)
    assert sum(p.samples for p in parts) == sum(sizes)
    # the refit and the guard cut a list of batches the same way (batch_parts)
    cut = batch_parts([len(x) for x, _ in whole], batch_size, part_samples)
    cluster = [part_data(data.loaders, "k", data.specs, "", p) for p in parts]
    assert [len(batches_of(part, batch_size)) for part in cluster] == cut
    target = max(1, part_samples // batch_size) * batch_size
    # every part but the last holds at least the target (cuts fall on batch starts only)
    assert all(p.samples >= target for p in parts[:-1])


def test_parts_follow_shape_runs_and_npy_files(tmp_path, rng):
    """Shards of another per-sample shape start a new run of batches; .npy shards are cut too."""
    model = dynamic_model(symbolic_hw=True)
    shapes = [(5, 2, 3, 3), (6, 2, 4, 4), (3, 2, 4, 4), (9, 2, 3, 3), (2, 3, 4)]  # the last: one sample
    for i, shape in enumerate(shapes):
        np.save(tmp_path / f"{i:02d}.npy", rng.normal(size=shape).astype(np.float32))
    data = open_calibration(tmp_path, model)
    assert [shard_layout(f)[0] for f in data.loaders] == [5, 6, 3, 9, 1]
    for batch_size in (2, 4):
        whole = batches_of(open_calibration(tmp_path, model), batch_size)
        _, found = part_batches(data, batch_size, 4)
        same_batches(whole, found)


def test_a_fixed_batch_size_drops_the_same_samples(tmp_path, rng):
    model = fixed_model(4)
    for i, n in enumerate([6, 5, 7]):
        np.savez(tmp_path / f"{i}.npz", x=rng.normal(size=(n, 2, 3, 3)).astype(np.float32))
    whole = open_calibration(tmp_path, model)
    expected = batches_of(whole, 99)
    parts, found = part_batches(open_calibration(tmp_path, model), 99, 8)
    same_batches(expected, found)
    assert all(x.shape[0] == 4 for x, _ in found) and len(found) == 4  # 18 samples: 2 left out
    assert sum(p.samples for p in parts) == 18


def test_in_memory_and_image_shards_have_a_layout(tmp_path, rng):
    spec = InputSpec("x", (None, 2, 3, 3), np.dtype(np.float32))
    data = in_memory([spec], {"x": rng.normal(size=(10, 2, 3, 3)).astype(np.float32)}, None, "mem")
    assert shard_layout(data.loaders[0]) == (10, (("x", (2, 3, 3)),))
    assert [p.pieces for p in plan_parts(data, 4, 8)] == [((0, 0, 8),), ((0, 8, 10),)]
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    images = open_calibration(tmp_path, fixed_model(None, (3, 4, 4)), image_chunk=2)
    assert [shard_layout(f) for f in images.loaders] == [(2, (("x", (3, 4, 4)),)), (1, (("x", (3, 4, 4)),))]
    whole = batches_of(open_calibration(tmp_path, fixed_model(None, (3, 4, 4)), image_chunk=2), 2)
    _, found = part_batches(images, 2, 2)
    same_batches(whole, found)


def test_a_part_is_a_plain_value():
    part = DataPart(((0, 4, 8), (1, 0, 3)))
    assert part.samples == 7
