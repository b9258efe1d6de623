"""Calibration data cut into parts for a cluster: each part yields the very batches a single pass does.

A single process re-batches the shards in one stream (:meth:`CalibrationData.batches`): a batch
may span two files, and a shard of another per-sample shape starts a new run of batches. A part
is a range of that stream cut only where a batch starts, so the part's own ``batches()`` give
the same batches, and summing per part in the parts' order is summing the single pass by parts.
The cuts come from the shards' sizes and shapes, read from the files' headers (no data is loaded
on the client); a part holds whole batches, about :data:`PART_SAMPLES` samples.
"""

from __future__ import annotations

import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from egp_onnx.errors import CalibrationError
from egp_onnx.load.calibration import (
    CalibrationData,
    InputSpec,
    SampleShape,
    _constant,
    _pair,
    sample_shape,
)
from egp_onnx.load.readers import LABELS_KEY, Batch, _load_images, read_npy, read_npz

#: Samples a part holds about (whole batches): parts, not workers, fix how a pass is summed, so
#: the sums are the same whatever the number of workers.
PART_SAMPLES = 256

Loader = Callable[[], tuple[Batch, np.ndarray | None]]


@dataclass(frozen=True)
class DataPart:
    """A range of the data's sample stream: (shard, begin, end) pieces, in order."""

    pieces: tuple[tuple[int, int, int], ...]

    @property
    def samples(self) -> int:
        """Samples in the part."""
        return sum(end - begin for _, begin, end in self.pieces)


def shard_layout(loader: Loader) -> tuple[int, SampleShape]:
    """A shard's sample count and per-sample shape, from the file's header (nothing is loaded).

    Raises:
        CalibrationError: the file is unreadable, or the shard is of a kind that cannot be cut.

    """
    func = getattr(loader, "func", None)
    args: tuple[Any, ...] = getattr(loader, "args", ())
    if func is read_npz:
        return _npz_layout(args[0])
    if func is read_npy:
        path, specs = args
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc
        shape = array.shape
        if len(shape) == len(specs[0].shape) - 1 and array.size:
            shape = (1, *shape)
        return _samples(shape), ((specs[0].name, tuple(shape[1:])),)
    if func in (_pair, _constant):
        arrays = args[0]
        return _samples(next(iter(arrays.values())).shape), sample_shape(arrays)
    if func is _load_images:  # partial(partial(f, **kw), part) is flattened into one partial
        keywords = loader.keywords  # type: ignore[attr-defined]
        size = (keywords["channels"], keywords["height"], keywords["width"])
        return len(args[0]), ((keywords["spec"].name, size),)
    name = getattr(func, "__name__", type(loader).__name__)
    raise CalibrationError(f"calibration shards read by {name} cannot be cut into parts for a cluster")


def _samples(shape: tuple[int, ...]) -> int:
    return int(shape[0]) if shape else 0


def _npz_layout(path: Path) -> tuple[int, SampleShape]:
    """Samples and per-sample shapes of an .npz's arrays, from their .npy headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                key = name[: -len(".npy")] if name.endswith(".npy") else name
                if key == LABELS_KEY:
                    continue
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, _ = np.lib.format.read_array_header_1_0(member)
                    else:
                        shape, _, _ = np.lib.format.read_array_header_2_0(member)
                shapes[key] = tuple(shape)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc
    if not shapes:
        raise CalibrationError(f"calibration file {path} is empty")
    first = next(iter(shapes.values()))
    return _samples(first), tuple((k, shapes[k][1:]) for k in sorted(shapes))


def plan_parts(data: CalibrationData, batch_size: int, part_samples: int = PART_SAMPLES) -> list[DataPart]:
    """The data cut into parts of whole batches of ``batch_size`` (the model's, when it fixes one)."""
    fixed = data.specs[0].shape[0] if data.specs[0].shape else None
    size = fixed or batch_size
    target = max(1, part_samples // size) * size
    parts: list[DataPart] = []
    pieces: list[tuple[int, int, int]] = []
    count = position = 0  # samples in the part so far; position in the current run of one shape
    previous: SampleShape | None = None
    for i, loader in enumerate(data.loaders):
        samples, shape = shard_layout(loader)
        if shape != previous:
            position = 0  # a new shape starts a new run of batches
        previous = shape
        offset = 0
        while offset < samples:
            if count >= target and position % size == 0:  # a batch starts here: cut
                parts.append(DataPart(tuple(pieces)))
                pieces, count = [], 0
            step = min(samples - offset, size - position % size)
            if pieces and pieces[-1][0] == i:
                pieces[-1] = (i, pieces[-1][1], offset + step)
            else:
                pieces.append((i, offset, offset + step))
            offset, position, count = offset + step, position + step, count + step
    if pieces:
        parts.append(DataPart(tuple(pieces)))
    return parts


def part_data(
    loaders: Sequence[Loader], key: str, specs: Sequence[InputSpec], description: str, part: DataPart
) -> CalibrationData:
    """The part as calibration data of its own, on a worker (``key`` names ``loaders`` for its cache)."""
    shards = [partial(_piece, loaders[i], (key, i), begin, end) for i, begin, end in part.pieces]
    return CalibrationData(specs, shards, description)


#: The last shard a worker process loaded: parts cut from one big file load it once per worker.
_LAST: dict[tuple[str, int], tuple[Batch, np.ndarray | None]] = {}
_LAST_LOCK = threading.Lock()


def _piece(loader: Loader, key: tuple[str, int], begin: int, end: int) -> tuple[Batch, np.ndarray | None]:
    with _LAST_LOCK:
        loaded = _LAST.get(key)
        if loaded is None:
            _LAST.clear()
            loaded = _LAST[key] = loader()
    arrays, labels = loaded
    return {k: v[begin:end] for k, v in arrays.items()}, None if labels is None else labels[begin:end]


def batch_parts(samples: Sequence[int], size: int, part_samples: int = PART_SAMPLES) -> list[int]:
    """Batches per part of a run of batches of ``samples`` each: :func:`plan_parts`' cuts, on batches.

    ``size``: the batch size the batches were cut to (the model's, when it fixes one). A part
    closes at the first batch start where it holds at least :func:`plan_parts`' target, so the
    batches of the data's first parts come in the same parts here as there.
    """
    target = max(1, part_samples // size) * size
    parts: list[int] = []
    count = 0
    for n in samples:
        if not parts or count >= target:
            parts.append(0)
            count = 0
        parts[-1] += 1
        count += n
    return parts
