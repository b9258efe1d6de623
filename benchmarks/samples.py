"""The shipped samples the benchmarks run on: one table, so a sample added here is known to each."""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
SETS = {  # model, calibration (the default command's --calib), unseen test set, input name
    "digits": ("digits_resnet.onnx", "digits_calib.npz", "digits_test.npz", "input"),
    "digits_train": ("digits_resnet.onnx", "digits_train.npz", "digits_test.npz", "input"),
    "mnist": ("mnist_resnet.onnx", "mnist_calib.npz", "mnist_test.npz", "image"),
    "fashion": ("fashion_resnet.onnx", "fashion_calib.npz", "fashion_test.npz", "image"),
    # the same data, the network at twice the width (22.5 M MACs, toward the issues' 45 M)
    "fashion_wide": ("fashion_wide_resnet.onnx", "fashion_calib.npz", "fashion_test.npz", "image"),
    # 4000 calibration images (a superset of the 1000): 1000 held out, the sensitivity caps off
    "fashion_4000": ("fashion_resnet.onnx", "fashion_calib_4000.npz", "fashion_test.npz", "image"),
    "mnist_4000": ("mnist_resnet.onnx", "mnist_calib_4000.npz", "mnist_test.npz", "image"),
    "fashion_wide_4000": ("fashion_wide_resnet.onnx", "fashion_calib_4000.npz", "fashion_test.npz", "image"),
}
