"""Calibration files: .npz and .npy shards, and folders of images, read into input arrays."""

from __future__ import annotations

import logging
import zipfile
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.npyio import NpzFile

from egp_onnx.errors import CalibrationError, one_line

if TYPE_CHECKING:
    from egp_onnx.load.calibration import InputSpec

log = logging.getLogger(__name__)

LABELS_KEY = "labels"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

Batch = dict[str, np.ndarray]


def shape_text(shape: tuple[int | None, ...]) -> str:
    """A shape for messages: (N, 3, ?, ?) with ? where a dim is symbolic."""
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


#: The first bytes of a zip archive (every .npz) and of an .npy file.
_ZIP_MAGIC = b"PK"
_NPY_MAGIC = b"\x93NUMPY"
#: What reading an archive or an array can raise on a damaged file (BadZipFile, zlib.error are no OSError).
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _load(path: Path, want: str) -> Batch | np.ndarray:
    """The arrays of an .npz (by member name) or the array of an .npy, read without pickles.

    A file that is neither, or cannot be read, is a one-line CalibrationError. The file is opened
    here, not by numpy, so that it is closed whatever goes wrong (numpy leaves a damaged zip open).
    ``want`` is ".npz" or ".npy": the message says which the file should be.
    """
    try:
        with open(path, "rb") as handle:
            if not handle.read(len(_NPY_MAGIC)).startswith((_ZIP_MAGIC, _NPY_MAGIC)):
                raise CalibrationError(
                    f"{path} is not an {want} file (neither a zip archive nor a numpy array)"
                )
            handle.seek(0)
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, NpzFile):
                return loaded
            with loaded as npz:
                arrays = {k: npz[k] for k in npz.files}
    except _READ_ERRORS as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {one_line(exc)}") from exc
    # NpzFile gives the raw bytes of a member that is no .npy file
    raw = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if raw:
        raise CalibrationError(f"{path}: member '{raw[0]}' is not a numpy array (.npy)")
    return arrays


def read_npz(path: Path) -> tuple[Batch, np.ndarray | None]:
    """An .npz shard: its arrays by input name, and its labels if it holds any."""
    arrays = _load(path, ".npz")
    if not isinstance(arrays, dict):
        raise CalibrationError(
            f"{path} holds one array, not an .npz archive: name it .npy, or save an .npz keyed by input name"
        )
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
    array = _load(path, ".npy")
    if isinstance(array, dict):
        raise CalibrationError(f"{path} is an .npz archive, not one array: name it .npz")
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


ARRAY_SUFFIXES = (".npz", ".npy")


def _visible(folder: Path) -> list[Path]:
    """The entries of ``folder`` that are not hidden, sorted.

    Hidden names (``.DS_Store``, macOS's ``._a.npz`` resource forks, ``.ipynb_checkpoints``) are
    never data, whatever their suffix: they are skipped without a word.
    """
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def list_folder(folder: Path) -> tuple[list[Path], list[tuple[Path, int | None]]]:
    """The data of a calibration folder: its .npz/.npy files, or else its images (sorted).

    A folder gives arrays or images, not both: when it holds .npz/.npy files, only they are read.
    Images come from the folder itself, or else from its sub-folders with one label per
    sub-folder. Whatever else is there and not read (images beside arrays, other files, pipes)
    is named in one warning; hidden files are skipped silently.
    """
    entries = _visible(folder)
    arrays = [p for p in entries if p.suffix.lower() in ARRAY_SUFFIXES and p.is_file()]
    images: list[tuple[Path, int | None]] = []
    if arrays:
        read: set[Path] = set(arrays)
    elif top := [p for p in entries if _is_image(p)]:
        images = [(p, None) for p in top]
        read = set(top)
    else:
        classes = [p for p in entries if p.is_dir()]
        read = set(classes)
        for label, sub in enumerate(classes):
            inside = _visible(sub)
            images.extend((p, label) for p in inside if _is_image(p))
            _warn_ignored(sub, [p for p in inside if not _is_image(p)], "its images")
    if arrays or images:
        _warn_ignored(
            folder, [p for p in entries if p not in read], "its .npz/.npy files" if arrays else "images"
        )
    return arrays, images


def _warn_ignored(folder: Path, ignored: list[Path], what: str) -> None:
    if ignored:
        kinds = "image" if all(_is_image(p) for p in ignored) else "other"
        log.warning(
            "%s: %d %s file(s) or folder(s) not read: %s (egp-onnx reads %s only)",
            folder,
            len(ignored),
            kinds,
            ", ".join(p.name for p in ignored[:3]) + (", ..." if len(ignored) > 3 else ""),
            what,
        )
