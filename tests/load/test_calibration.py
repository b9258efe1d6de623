"""Calibration data (load/calibration.py): files and folders read and rebatched, labels, a fixed
batch's leftover samples, the held-out split; mismatches refused."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compress_plain
from models import image_model, inputs, save, single_conv, two_convs
from onnx import TensorProto, helper, numpy_helper
from references import run_ort

import egp_onnx
from egp_onnx.errors import CalibrationError
from egp_onnx.load.calibration import BATCH_BYTES, open_calibration, split_holdout
from egp_onnx.load.model import prepare_model


@pytest.fixture
def model(rng):
    return prepare_model(single_conv(rng))


def all_samples(data, batch_size):
    batches = list(data.batches(batch_size))
    return np.concatenate([b["x"] for b, _ in batches]), [len(b["x"]) for b, _ in batches], batches


def test_npz_with_labels_rebatched(model, rng, tmp_path):
    x = inputs(rng, n=10)
    np.savez(tmp_path / "c.npz", x=x, labels=np.arange(10))
    got, sizes, batches = all_samples(open_calibration(tmp_path / "c.npz", model), 4)
    np.testing.assert_array_equal(got, x)
    assert sizes == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in batches]), np.arange(10))


def test_npy_and_folder_of_files(model, rng, tmp_path):
    x = inputs(rng, n=9)
    np.save(tmp_path / "one.npy", x)
    got, _, _ = all_samples(open_calibration(tmp_path / "one.npy", model), 5)
    np.testing.assert_array_equal(got, x)
    folder = tmp_path / "parts"
    folder.mkdir()
    np.save(folder / "a.npy", x[:4])
    np.savez(folder / "b.npz", x=x[4:])
    got, sizes, _ = all_samples(open_calibration(folder, model), 3)
    np.testing.assert_array_equal(got, x)
    assert sizes == [3, 3, 3]


def test_image_folder_with_class_subfolders(tmp_path, rng):
    from PIL import Image

    model = prepare_model(image_model(rng))
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 255, size=(10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    data = open_calibration(tmp_path, model, mean=(0.5,), std=(0.25,))
    batches = list(data.batches(4))
    x = np.concatenate([b["x"] for b, _ in batches])
    labels = np.concatenate([lab for _, lab in batches])
    assert x.shape == (6, 3, 6, 6) and x.dtype == np.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    first = np.asarray(Image.open(tmp_path / "cat" / "0.png").convert("RGB").resize((6, 6)), dtype=np.float32)
    np.testing.assert_allclose(x[0], (first.transpose(2, 0, 1) / 255 - 0.5) / 0.25, rtol=1e-6)


class Reader:
    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def test_calibration_data_reader(model, rng):
    x = inputs(rng, n=6)
    got, sizes, _ = all_samples(open_calibration(Reader([{"x": x[:2]}, {"x": x[2:]}]), model), 3)
    np.testing.assert_array_equal(got, x)
    assert sizes == [3, 3]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": np.zeros((2, 3, 6, 6), np.float32)}, "no data for model input(s) x"),
        ({"x": np.zeros((2, 3, 6), np.float32)}, "has rank 3"),
        ({"x": np.zeros((2, 3, 5, 6), np.float32)}, "has shape (2, 3, 5, 6)"),
        ({"x": np.zeros((2, 3, 6, 6), np.float64)}, "has dtype float64"),
        ({"x": np.full((2, 3, 6, 6), np.nan, np.float32)}, "NaN or Inf"),
        ({"x": np.zeros((0, 3, 6, 6), np.float32)}, "holds no samples"),
        ({"x": np.ones((2, 3, 6, 6), np.float32), "extra": np.ones(2)}, "extra is not a model input"),
    ],
)
def test_mismatches_are_refused(model, tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CalibrationError, match=None) as info:
        open_calibration(tmp_path / "bad.npz", model)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_and_missing(model, tmp_path):
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(CalibrationError, match="is empty"):
        open_calibration(tmp_path / "empty.npz", model)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CalibrationError, match="no .npz, .npy or image files"):
        open_calibration(tmp_path / "nothing", model)
    with pytest.raises(CalibrationError, match="not found"):
        open_calibration(tmp_path / "missing.npz", model)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="is not an .npz file"):
        open_calibration(tmp_path / "bad.npz", model)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_workers_load_ahead_in_order(model, rng, tmp_path, workers):
    folder = tmp_path / "parts"
    folder.mkdir()
    x = inputs(rng, n=23)
    for i in range(0, 23, 4):
        np.savez(folder / f"p{i:02d}.npz", x=x[i : i + 4], labels=np.arange(i, min(i + 4, 23)))
    data = open_calibration(folder, model, workers=workers)
    got, sizes, batches = all_samples(data, 5)
    np.testing.assert_array_equal(got, x)
    assert sizes == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in batches]), np.arange(23))
    again, _, _ = all_samples(data, 7)  # a second pass reads the shards again
    np.testing.assert_array_equal(again, x)


def test_workers_report_a_bad_shard(model, rng, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    np.savez(folder / "a.npz", x=inputs(rng, n=4))
    np.savez(folder / "b.npz", x=inputs(rng, n=4).astype(np.float64))
    data = open_calibration(folder, model, workers=2)
    with pytest.raises(CalibrationError, match=r"part 2\).*dtype float64"):
        list(data.batches(3))


def test_one_hot_labels_count_as_their_argmax(tmp_path):
    rng = np.random.default_rng(11)
    model = two_convs(rng)
    flat = helper.make_node("Flatten", ["y"], ["f"], name="flat")
    head = helper.make_node("Gemm", ["f", "hw"], ["logits"], name="fc", transB=1)
    model.graph.node.extend([flat, head])
    model.graph.initializer.append(
        numpy_helper.from_array(rng.normal(size=(5, 144)).astype(np.float32), "hw")
    )
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]))
    save(model, tmp_path / "m.onnx")
    x = inputs(rng, n=40)
    labels = rng.integers(0, 5, 40)
    np.savez(tmp_path / "index.npz", x=x, labels=labels)
    np.savez(tmp_path / "onehot.npz", x=x, labels=np.eye(5, dtype=np.float32)[labels])
    want = float((run_ort(model, {"x": x})[0].argmax(1) == labels).mean())
    for eval_file in ("index.npz", "onehot.npz"):
        report = compress_plain(
            tmp_path / "m.onnx",
            tmp_path / "index.npz",
            sparsity=0.3,
            eval_data=tmp_path / eval_file,
            latency=False,
        ).report
        assert report.fidelity.accuracy_before == pytest.approx(want)
    np.savez(tmp_path / "cube.npz", x=x, labels=np.zeros((40, 5, 2)))
    with pytest.raises(egp_onnx.EgpError, match=r"'labels' have shape \(40, 5, 2\); give class indices"):
        compress_plain(tmp_path / "m.onnx", tmp_path / "index.npz", eval_data=tmp_path / "cube.npz")


def test_samples_that_do_not_fill_a_fixed_batch_are_counted(tmp_path, rng, caplog):
    model = two_convs(rng)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=10))
    with caplog.at_level("WARNING", logger="egp_onnx"):
        report = compress_plain(model, tmp_path / "c.npz", sparsity=0.5, latency=False).report
    warned = [r.getMessage() for r in caplog.records if "fixed at 4" in r.getMessage()]
    assert warned == [
        f"{tmp_path / 'c.npz'}: the model's batch size is fixed at 4: 2 of 10 samples do not fill a batch "
        "and are not used (give a multiple of 4 samples)"
    ], "said once, with the count"
    assert report.samples == 8 and report.fidelity.samples == 8


def test_holdout_split_is_disjoint_and_seeded(rng, tmp_path):
    model = prepare_model(single_conv(rng))
    x = inputs(rng, n=20)
    np.savez(tmp_path / "c.npz", x=x, labels=np.arange(20))
    data = open_calibration(tmp_path / "c.npz", model)
    calib, held = split_holdout(data, 0.25, seed=3)
    (xc, lc), (xh, lh) = calib.arrays(), held.arrays()
    np.testing.assert_array_equal(xc["x"], x[lc])
    assert len(lh) == 5 and len(lc) == 15
    assert sorted([*lc.tolist(), *lh.tolist()]) == list(range(20))
    np.testing.assert_array_equal(xh["x"], x[lh])
    again = split_holdout(data, 0.25, seed=3)[1].arrays()[1]
    np.testing.assert_array_equal(again, lh)


def symbolic_hw(model):
    """``model`` with its input's H and W made symbolic (the first conv pads, so any size runs)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for axis, name in ((2, "H"), (3, "W")):
        dims[axis].Clear()
        dims[axis].dim_param = name
    return model


def test_batches_never_mix_shapes_and_same_shape_shards_merge(rng, tmp_path):
    model = prepare_model(symbolic_hw(single_conv(rng)))
    parts = [
        inputs(rng, n=3, shape=(3, 6, 6)),
        inputs(rng, n=2, shape=(3, 6, 6)),
        inputs(rng, n=5, shape=(3, 8, 5)),
        inputs(rng, n=4, shape=(3, 6, 6)),
    ]
    for i, x in enumerate(parts):
        np.savez(tmp_path / f"{i}.npz", x=x, labels=np.full(len(x), i))
    batches = list(open_calibration(tmp_path, model).batches(4))
    # 3 + 2 of 6x6 merge into 4 + 1; the 8x5 shard is batched on its own; the last 6x6 shard
    # is not merged with the first two: it comes after another shape.
    assert [(b["x"].shape, lab.tolist()) for b, lab in batches] == [
        ((4, 3, 6, 6), [0, 0, 0, 1]),
        ((1, 3, 6, 6), [1]),
        ((4, 3, 8, 5), [2, 2, 2, 2]),
        ((1, 3, 8, 5), [2]),
        ((4, 3, 6, 6), [3, 3, 3, 3]),
    ]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b, _ in batches[:2]]), np.concatenate(parts[:2]))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b, _ in batches[2:4]]), parts[2])
    np.testing.assert_array_equal(batches[4][0]["x"], parts[3])


def test_a_fixed_batch_counts_the_leftovers_of_every_shape(rng, tmp_path, caplog):
    model = symbolic_hw(single_conv(rng))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    np.savez(tmp_path / "a.npz", x=inputs(rng, n=6, shape=(3, 6, 6)))
    np.savez(tmp_path / "b.npz", x=inputs(rng, n=9, shape=(3, 7, 9)))
    data = open_calibration(tmp_path, prepare_model(model))
    with caplog.at_level("WARNING", logger="egp_onnx"):
        shapes = [b["x"].shape for b, _ in data.batches(16)]
    assert shapes == [(4, 3, 6, 6), (4, 3, 7, 9), (4, 3, 7, 9)]
    assert data.unused == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: the model's batch size is fixed at 4: 3 of 15 samples do not fill a batch of their "
        "shape and are not used (give a multiple of 4 samples of each shape)"
    ]


def test_holdout_split_of_mixed_shapes_keeps_each_shape_apart(rng, tmp_path):
    model = prepare_model(symbolic_hw(single_conv(rng)))
    sizes = [(6, 6), (6, 6), (9, 7), (5, 8)]
    for i, (h, w) in enumerate(sizes):
        x = inputs(rng, n=5, shape=(3, h, w))
        x[:, 0, 0, 0] = np.arange(5) + 10 * i  # each sample's id, to follow it through the split
        np.savez(tmp_path / f"{i}.npz", x=x, labels=np.arange(5) + 10 * i)
    data = open_calibration(tmp_path, model)
    calib, held = split_holdout(data, 0.3, seed=1)
    seen = []
    for part in (calib, held):
        for feed, labels in part.batches(3):
            np.testing.assert_array_equal(feed["x"][:, 0, 0, 0], labels)  # samples keep their labels
            h, w = sizes[int(labels[0]) // 10]
            assert feed["x"].shape[2:] == (h, w) and all(sizes[int(k) // 10] == (h, w) for k in labels)
            seen.append(labels)
    assert sum(len(s) for s in seen[: len(list(calib.batches(3)))]) == 14
    assert sorted(np.concatenate(seen).tolist()) == [k + 10 * i for i in range(4) for k in range(5)]
    with pytest.raises(CalibrationError, match="samples of 3 shapes in turn do not make one array"):
        data.arrays()
    again = [lab.tolist() for _, lab in split_holdout(data, 0.3, seed=1)[1].batches(3)]
    assert again == [lab.tolist() for _, lab in held.batches(3)], "seeded"


def test_large_samples_go_in_batches_of_bounded_bytes(rng, tmp_path):
    """Pages of 3x512x512 float32 (3 MiB each): 16 MiB hold 5 of them, whatever --batch-size asks."""
    model = single_conv(rng)
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], "HW", strict=True):
        dim.dim_param = name  # input (N, 3, H, W)
    pages = rng.normal(size=(12, 3, 512, 512)).astype(np.float32)
    np.save(tmp_path / "pages.npy", pages)
    data = open_calibration(tmp_path / "pages.npy", model)
    assert BATCH_BYTES // pages[0].nbytes == 5
    sizes = [len(feed["x"]) for feed, _ in data.batches(32)]
    assert sizes == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate([feed["x"] for feed, _ in data.batches(32)]), pages)
    assert [len(feed["x"]) for feed, _ in data.batches(2)] == [2] * 6  # a smaller batch size stays
