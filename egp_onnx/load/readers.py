"""Calibration files: .npz and .npy shards, and folders of images, read into input arrays."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from egp_onnx.errors import CalibrationError

if TYPE_CHECKING:
    from egp_onnx.load.calibration import InputSpec

LABELS_KEY = "labels"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

Batch = dict[str, np.ndarray]


def shape_text(shape: tuple[int | None, ...]) -> str:
    """A shape for messages: (N, 3, ?, ?) with ? where a dim is symbolic."""
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def read_npz(path: Path) -> tuple[Batch, np.ndarray | None]:
    """An .npz shard: its arrays by input name, and its labels if it holds any."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc
    if not arrays:
        raise CalibrationError(f"calibration file {path} is empty")
    labels = arrays.pop(LABELS_KEY, None)
    return arrays, labels


def read_npy(path: Path, specs: Sequence[InputSpec]) -> tuple[Batch, np.ndarray | None]:
    """An .npy shard of a single-input model (one sample may come without its batch axis)."""
    if len(specs) != 1:
        raise CalibrationError(
            f"{path}: a .npy file feeds a single-input model; this model has inputs "
            f"{', '.join(s.name for s in specs)}: use an .npz keyed by input name"
        )
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc
    if array.ndim == len(specs[0].shape) - 1 and array.size:
        array = array[None]  # one sample without its batch axis
    return {specs[0].name: array}, None


def image_shards(
    folder: Path,
    images: list[tuple[Path, int | None]],
    spec: InputSpec,
    mean: Sequence[float],
    std: Sequence[float],
    chunk: int,
) -> list[Callable[[], tuple[Batch, np.ndarray | None]]]:
    """Shards of ``chunk`` images each, decoded when loaded, resized and normalised for ``spec``."""
    if len(spec.shape) != 4 or any(d is None for d in spec.shape[1:]):
        raise CalibrationError(
            f"{folder}: images need a model input of fixed shape (N, C, H, W); "
            f"'{spec.name}' is {shape_text(spec.shape)}"
        )
    channels, height, width = (int(d) for d in spec.shape[1:])  # type: ignore[arg-type]
    if channels not in (1, 3):
        raise CalibrationError(f"{folder}: images need 1 or 3 input channels, model has {channels}")
    mean_a = _per_channel(mean, channels, "--mean")
    std_a = _per_channel(std, channels, "--std")
    if (std_a == 0).any():
        raise CalibrationError("--std values must be non-zero")
    try:
        import PIL.Image  # noqa: F401  (checked here, before any work; decoded in _load_images)
    except ImportError as exc:
        raise CalibrationError("reading images needs Pillow: pip install 'egp-onnx[images]'") from exc

    # A module-level function in a partial, not a closure: a shard is pickled to cluster workers.
    load = partial(
        _load_images, channels=channels, height=height, width=width, mean=mean_a, std=std_a, spec=spec
    )
    return [partial(load, images[i : i + chunk]) for i in range(0, len(images), chunk)]


def _load_images(
    part: list[tuple[Path, int | None]],
    *,
    channels: int,
    height: int,
    width: int,
    mean: np.ndarray,
    std: np.ndarray,
    spec: InputSpec,
) -> tuple[Batch, np.ndarray | None]:
    """One shard of images, decoded, resized to (height, width) and normalised."""
    from PIL import Image

    batch = np.empty((len(part), channels, height, width), dtype=np.float32)
    for i, (path, _) in enumerate(part):
        try:
            with Image.open(path) as img:
                resized = img.convert("L" if channels == 1 else "RGB").resize((width, height))
                pixels = np.asarray(resized, dtype=np.float32) / 255.0
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"cannot read image {path}: {exc}") from exc
        pixels = pixels.reshape(height, width, -1).transpose(2, 0, 1)
        batch[i] = (pixels - mean[:, None, None]) / std[:, None, None]
    labels = None
    if all(label is not None for _, label in part):
        labels = np.array([label for _, label in part], dtype=np.int64)
    return {spec.name: batch.astype(spec.dtype)}, labels


def _per_channel(values: Sequence[float], channels: int, option: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.size == 1:
        return np.repeat(array, channels)
    if array.size != channels:
        raise CalibrationError(f"{option} needs 1 or {channels} values, got {array.size}")
    return array


def find_images(folder: Path) -> list[tuple[Path, int | None]]:
    """The images of ``folder``, or of its sub-folders with one label per sub-folder (sorted)."""
    top = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if top:
        return [(p, None) for p in top]
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    found: list[tuple[Path, int | None]] = []
    for label, sub in enumerate(classes):
        found.extend((p, label) for p in sorted(sub.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
    return found
