"""Calibration data: .npz, .npy, folders of them, images, and CalibrationDataReaders, in batches.

The files are read in :mod:`egp_onnx.load.readers`. Every batch is checked against the model's
inputs (names, ranks, fixed dims, dtypes, finiteness).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import helper

from egp_onnx.errors import CalibrationError, one_line
from egp_onnx.load.readers import LABELS_KEY, Batch, image_shards, list_folder, read_npy, read_npz, shape_text

log = logging.getLogger(__name__)


class CalibrationDataReader(Protocol):
    """onnxruntime.quantization's reader protocol: get_next() gives a feed dict, then None."""

    def get_next(self) -> dict[str, Any] | None:
        """The next feed dict, or None when the data is exhausted."""


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, dims (None where symbolic) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tensor_type.shape.dim
        )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dims, dtype))
    return specs


def _check_arrays(arrays: Batch, specs: Sequence[InputSpec], where: str) -> int:
    """Check names, ranks, fixed dims, dtypes and finiteness; return the sample count."""
    wanted = {s.name for s in specs}
    missing = sorted(wanted - arrays.keys())
    if missing:
        raise CalibrationError(
            f"{where}: no data for model input(s) {', '.join(missing)} "
            f"(found {', '.join(sorted(arrays)) or 'nothing'})"
        )
    unknown = sorted(arrays.keys() - wanted)
    if unknown:
        raise CalibrationError(
            f"{where}: {', '.join(unknown)} is not a model input "
            f"(model inputs: {', '.join(sorted(wanted))}; labels go under '{LABELS_KEY}')"
        )
    samples: int | None = None
    for spec in specs:
        array = arrays[spec.name]
        if array.ndim != len(spec.shape):
            raise CalibrationError(
                f"{where}: input '{spec.name}' has rank {array.ndim} {array.shape}, "
                f"the model expects rank {len(spec.shape)} {shape_text(spec.shape)}"
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if axis > 0 and want is not None and got != want:
                raise CalibrationError(
                    f"{where}: input '{spec.name}' has shape {array.shape}, "
                    f"the model expects {shape_text(spec.shape)}"
                )
        if array.dtype != spec.dtype:
            raise CalibrationError(
                f"{where}: input '{spec.name}' has dtype {array.dtype}, the model expects "
                f"{spec.dtype} (convert with .astype(np.{spec.dtype.name}))"
            )
        if array.ndim == 0 or array.shape[0] == 0:
            raise CalibrationError(f"{where}: input '{spec.name}' holds no samples")
        if samples is not None and array.shape[0] != samples:
            raise CalibrationError(f"{where}: inputs hold different numbers of samples")
        samples = array.shape[0]
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise CalibrationError(f"{where}: input '{spec.name}' contains NaN or Inf values")
    assert samples is not None  # specs is never empty: checked in CalibrationData
    return samples


def class_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Class indices (N,): one-hot or score rows (N, C) become their argmax.

    Raises:
        CalibrationError: labels of another rank, or not numbers.

    """
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise CalibrationError(f"{where}: '{LABELS_KEY}' hold {labels.dtype} values; give class indices")
    if labels.ndim == 2:
        return labels.argmax(axis=1)
    if labels.ndim != 1:
        raise CalibrationError(
            f"{where}: '{LABELS_KEY}' have shape {labels.shape}; "
            "give class indices (N,) or one-hot rows (N, C)"
        )
    return labels


#: Input bytes a batch holds at most (with a dynamic batch axis): onnxruntime's intermediate
#: tensors grow with the batch, about 25 times the input on a detection model (PP-OCRv4 det on
#: 3x736x1000 pages: 1.77 GB peak at 8 pages a batch), so large samples go in smaller batches.
BATCH_BYTES = 16 * 2**20


class CalibrationData:
    """Calibration batches for one model, streamed shard by shard and re-batched.

    A shard is one file's worth (or one reader batch) of samples. Shards are loaded lazily and
    checked as they arrive; the first shard is checked when the data is opened, so obvious
    mismatches fail before any work starts. With ``workers`` > 0, that many threads load the
    next shards while the current one is in use (at most ``workers`` + 1 shards in memory).
    """

    def __init__(
        self,
        specs: Sequence[InputSpec],
        shards: Sequence[Callable[[], tuple[Batch, np.ndarray | None]]],
        description: str,
        workers: int = 0,
    ) -> None:
        if not specs:
            raise CalibrationError("the model has no inputs to feed")
        if not shards:
            raise CalibrationError(f"{description}: no calibration data found")
        if workers < 0:
            raise CalibrationError(f"--workers must be at least 0, got {workers}")
        self.specs = list(specs)
        self.description = description
        self.workers = workers
        self._shards = list(shards)
        self.unused = 0  # samples left out of a pass: they do not fill the model's fixed batch size
        self._first: tuple[Batch, np.ndarray | None] | None = self._load(0)  # checked now, used once
        first = self._first[0]
        samples = max(1, next(iter(first.values())).shape[0])
        self.sample_bytes = max(1, sum(a.nbytes for a in first.values()) // samples)  # of the first shard

    @property
    def loaders(self) -> Sequence[Callable[[], tuple[Batch, np.ndarray | None]]]:
        """The shards' loaders, in order (load/parts.py cuts them into parts for a cluster).

        The same object at every call: a cluster shares it with its workers once per run.
        """
        return self._shards

    def _load(self, i: int) -> tuple[Batch, np.ndarray | None]:
        arrays, labels = self._shards[i]()
        where = self.description if len(self._shards) == 1 else f"{self.description} (part {i + 1})"
        samples = _check_arrays(arrays, self.specs, where)
        if labels is not None:
            labels = class_labels(labels, where)
            if len(labels) != samples:
                raise CalibrationError(f"{where}: {len(labels)} labels for {samples} samples")
        return arrays, labels

    def batches(self, batch_size: int) -> Iterator[tuple[Batch, np.ndarray | None]]:
        """Yield (feed, labels) batches of ``batch_size`` samples (the last of a shape may be smaller).

        A batch never mixes per-sample shapes: consecutive shards whose samples have the same
        shape are re-batched together, and a shard of another shape closes the batch in progress
        (models with symbolic H/W are calibrated with images of many sizes). Data of one shape
        is batched exactly as if shapes were never looked at.

        Fewer samples go in a batch when ``batch_size`` of them would hold more than
        :data:`BATCH_BYTES` of input (one at least).

        A model whose batch size is fixed gets batches of exactly that size; samples that do not
        fill the last batch of a shape are left out, and a warning says how many.
        """
        fixed = self.specs[0].shape[0] if self.specs[0].shape else None
        if fixed is not None:
            batch_size = fixed
        else:
            batch_size = max(1, min(batch_size, BATCH_BYTES // self.sample_bytes))
        pending: list[tuple[Batch, np.ndarray | None]] = []
        pending_size = total = unused = 0
        pending_shape: SampleShape | None = None
        mixed = False
        for shard in self._loaded():
            shape = sample_shape(shard[0])
            mixed = mixed or (pending_shape is not None and shape != pending_shape)
            if pending_size and shape != pending_shape:
                if fixed is None:
                    yield _concat(pending)
                else:
                    unused += pending_size
                pending, pending_size = [], 0
            pending_shape = shape
            pending.append(shard)
            pending_size += next(iter(shard[0].values())).shape[0]
            total += next(iter(shard[0].values())).shape[0]
            del shard  # no reference may outlive the shard's last batch: memory stays at one shard
            while pending_size >= batch_size:
                merged, merged_labels = _concat(pending)
                yield _take(merged, 0, batch_size), _slice(merged_labels, 0, batch_size)
                pending_size -= batch_size
                # Keep only a view of what is left; an empty rest is dropped so that shards whose
                # size is a multiple of the batch size are never copied.
                rest = (_take(merged, batch_size, None), _slice(merged_labels, batch_size, None))
                pending = [rest] if pending_size else []
                del merged, merged_labels, rest
        if pending_size and fixed is None:
            yield _concat(pending)
            return
        unused += pending_size
        if unused and not self.unused:
            self.unused = unused  # warned once per data set, not at every loop step
            log.warning(
                "%s: the model's batch size is fixed at %d: %d of %d samples do not fill a batch%s "
                "and are not used (give a multiple of %d samples%s)",
                self.description,
                batch_size,
                unused,
                total,
                " of their shape" if mixed else "",
                batch_size,
                " of each shape" if mixed else "",
            )

    def _loaded(self) -> Iterator[tuple[Batch, np.ndarray | None]]:
        """The shards in order, loaded ahead by ``workers`` threads when asked."""
        first, self._first = self._first, None  # the first pass reuses the checked shard, once
        yield first if first is not None else self._load(0)
        del first
        rest = range(1, len(self._shards))
        if self.workers == 0:
            yield from (self._load(i) for i in rest)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="egp-data") as pool:
            ahead: deque[Future[tuple[Batch, np.ndarray | None]]] = deque()
            for i in rest:
                ahead.append(pool.submit(self._load, i))
                if len(ahead) > self.workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def arrays(self) -> tuple[Batch, np.ndarray | None]:
        """All samples at once (for small held-out sets); data of one per-sample shape only.

        Raises:
            CalibrationError: the samples have several shapes (see :meth:`runs`).

        """
        parts = self.runs()
        if len(parts) > 1:
            raise CalibrationError(
                f"{self.description}: samples of {len(parts)} shapes in turn do not make one array"
            )
        return parts[0]

    def runs(self) -> list[tuple[Batch, np.ndarray | None]]:
        """All samples at once, one part per run of consecutive shards of one per-sample shape.

        Labels are kept only when every shard has them (as :meth:`batches` gives them).
        """
        runs: list[list[tuple[Batch, np.ndarray | None]]] = []
        last: SampleShape | None = None
        for shard in self._loaded():
            shape = sample_shape(shard[0])
            if runs and shape == last:
                runs[-1].append(shard)
            else:
                runs.append([shard])
            last = shape
        parts = [_concat(run) for run in runs]
        if any(labels is None for _, labels in parts):
            parts = [(arrays, None) for arrays, _ in parts]
        return parts


#: The shape of one sample of every input, by input name (sorted): batches never mix two of them.
SampleShape = tuple[tuple[str, tuple[int, ...]], ...]


def sample_shape(arrays: Batch) -> SampleShape:
    """The per-sample shape (all dims but the batch axis) of each input of a batch."""
    return tuple((name, arrays[name].shape[1:]) for name in sorted(arrays))


def _take(arrays: Batch, start: int, stop: int | None) -> Batch:
    return {k: v[start:stop] for k, v in arrays.items()}


def _slice(labels: np.ndarray | None, start: int, stop: int | None) -> np.ndarray | None:
    return None if labels is None else labels[start:stop]


def _concat(parts: list[tuple[Batch, np.ndarray | None]]) -> tuple[Batch, np.ndarray | None]:
    if len(parts) == 1:
        return parts[0]
    arrays = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    labels = None
    if all(p[1] is not None for p in parts):
        labels = np.concatenate([p[1] for p in parts if p[1] is not None])
    return arrays, labels


def open_calibration(
    source: str | os.PathLike[str] | CalibrationDataReader,
    model: onnx.ModelProto,
    *,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    image_chunk: int = 256,
    workers: int = 0,
) -> CalibrationData:
    """Open calibration data for ``model`` and check it against the model's inputs.

    Args:
        source: an .npz (keys = input names, optional ``labels``), an .npy (single-input
            models), a folder of .npz/.npy files, a folder of images (optionally in one
            sub-folder per class, which gives labels), or a CalibrationDataReader.
        model: the model the data feeds.
        mean: per-channel mean subtracted from images scaled to [0, 1].
        std: per-channel standard deviation images are divided by.
        image_chunk: images decoded per shard.
        workers: threads that load (decode) the next shards ahead; 0 loads in the caller's thread.

    Raises:
        CalibrationError: the data is missing, empty, unreadable or does not match the inputs.

    """
    specs = input_specs(model)
    if hasattr(source, "get_next"):
        return _from_reader(source, specs)  # type: ignore[arg-type]
    path = Path(source)
    if not path.exists():
        raise CalibrationError(f"calibration data not found: {path}")
    if path.is_file():
        if path.suffix == ".npz":
            return CalibrationData(specs, [partial(read_npz, path)], str(path), workers)
        if path.suffix == ".npy":
            return CalibrationData(specs, [partial(read_npy, path, specs)], str(path), workers)
        raise CalibrationError(f"{path}: calibration files must be .npz or .npy")
    if not path.is_dir():
        raise CalibrationError(
            f"{path} is neither a file nor a folder (a pipe or device): the data is read more than once"
        )
    files, images = list_folder(path)
    if files:
        shards = [
            partial(read_npz, p) if p.suffix.lower() == ".npz" else partial(read_npy, p, specs) for p in files
        ]
        return CalibrationData(specs, shards, str(path), workers)
    if not images:
        raise CalibrationError(f"{path}: no .npz, .npy or image files in the calibration folder")
    if len(specs) != 1:
        raise CalibrationError(f"{path}: image folders feed single-input models only")
    return CalibrationData(
        specs, image_shards(path, images, specs[0], mean, std, image_chunk), str(path), workers
    )


def _from_reader(reader: CalibrationDataReader, specs: Sequence[InputSpec]) -> CalibrationData:
    name = type(reader).__name__
    feeds: list[Batch] = []
    while True:
        try:
            feed = reader.get_next()
        except Exception as exc:  # the user's code: its failure is reported, not a defect of ours
            failure = f"{type(exc).__name__}: {one_line(exc)}"
            raise CalibrationError(f"{name}.get_next() failed: {failure}") from exc
        if feed is None:
            break
        if not isinstance(feed, Mapping) or not all(isinstance(k, str) for k in feed):
            raise CalibrationError(
                f"{name}.get_next() returned a {type(feed).__name__}; a CalibrationDataReader returns "
                "a dict of arrays keyed by input name, then None"
            )
        try:
            feeds.append({k: np.asarray(v) for k, v in feed.items()})
        except (ValueError, TypeError) as exc:
            raise CalibrationError(
                f"{name}.get_next() returned values that are not arrays: {one_line(exc)}"
            ) from exc
    return CalibrationData(specs, [partial(_constant, f) for f in feeds], name)


def _constant(feed: Batch) -> tuple[Batch, np.ndarray | None]:
    return feed, None


def in_memory(
    specs: Sequence[InputSpec], arrays: Batch, labels: np.ndarray | None, description: str
) -> CalibrationData:
    """Calibration data held in memory (one shard)."""
    return CalibrationData(specs, [partial(_pair, arrays, labels)], description)


def _pair(arrays: Batch, labels: np.ndarray | None) -> tuple[Batch, np.ndarray | None]:
    return arrays, labels


#: The automatic held-out split: at least this many samples when the data allows ...
HOLDOUT_SAMPLES = 500
#: ... but never more than this fraction of the calibration data.
HOLDOUT_MAX_FRACTION = 0.5


def automatic_holdout(samples: int) -> int:
    """Samples held out when the user gives neither eval data nor a fraction (0 if too few)."""
    if samples < 4:
        return 0
    return min(max(HOLDOUT_SAMPLES, samples // 4), int(samples * HOLDOUT_MAX_FRACTION))


def holdout_count(samples: int, fraction: float | None, batch: int | None = None) -> int:
    """How many of ``samples`` to hold out: ``fraction`` of them, or :func:`automatic_holdout`.

    ``batch`` is the model's fixed batch size, if it has one. Then the automatic count is the
    multiple of ``batch`` nearest to it that leaves at least one batch to calibrate with, and 0
    (measure on the calibration data) when the samples fill fewer than two batches.

    Raises:
        CalibrationError: an explicit ``fraction`` leaves one part empty, or below one fixed batch.

    """
    if fraction is None:
        held = automatic_holdout(samples)
        if batch is None or held == 0:
            return held
        batches = samples // batch
        return 0 if batches < 2 else min(max(1, round(held / batch)), batches - 1) * batch
    held = int(round(fraction * samples))
    need = batch or 1
    if held < need or samples - held < need:
        rule = (
            "both need at least one"
            if batch is None
            else (
                f"the model's batch size is fixed at {batch}, so both need at least {batch} "
                "(--holdout 0 measures on the calibration data)"
            )
        )
        raise CalibrationError(
            f"--holdout {fraction} of {samples} samples leaves {held} held out and {samples - held} "
            f"for calibration; {rule}"
        )
    return held


def split_holdout(
    data: CalibrationData, fraction: float | None, seed: int, batch: int | None = None
) -> tuple[CalibrationData, CalibrationData]:
    """Split ``fraction`` of the samples off as held-out data (seeded); returns (calib, holdout).

    ``fraction=None`` holds out :func:`automatic_holdout` samples; ``batch`` is the model's fixed
    batch size, if any (see :func:`holdout_count`). When nothing is held out (too few samples for
    an automatic split), both parts are the same data: fidelity is measured on the calibration data.
    """
    runs = data.runs()
    sizes = [next(iter(arrays.values())).shape[0] for arrays, _ in runs]
    samples = sum(sizes)
    held = holdout_count(samples, fraction, batch)
    if held == 0:
        whole = CalibrationData(data.specs, [partial(_pair, a, lab) for a, lab in runs], data.description)
        return whole, whole
    # One permutation of all samples, whatever their shapes; each part keeps the samples of each
    # run of one shape together, in their order, so no batch of either part mixes two shapes.
    order = np.random.default_rng(seed).permutation(samples)
    starts = np.cumsum([0, *sizes])
    parts = []
    for idx, name in ((np.sort(order[held:]), "calibration"), (np.sort(order[:held]), "holdout")):
        shards = []
        for (arrays, labels), start, stop in zip(runs, starts[:-1], starts[1:], strict=True):
            local = idx[(idx >= start) & (idx < stop)] - start if len(runs) > 1 else idx
            if local.size:
                shards.append(partial(_pair, {k: v[local] for k, v in arrays.items()}, _pick(labels, local)))
        parts.append(CalibrationData(data.specs, shards, f"{data.description} ({name})"))
    return parts[0], parts[1]


def _pick(labels: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if labels is None else labels[idx]
