from __future__ import annotations

import numpy as np
import pytest
from models import image_model, inputs, single_conv

from egp_onnx.errors import CalibrationError
from egp_onnx.load.calibration import open_calibration
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
    with pytest.raises(CalibrationError, match="cannot read"):
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
