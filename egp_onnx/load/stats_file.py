"""Statistics files: ON counts as an .npz that ``egp-onnx stats`` writes and ``--stats`` merges."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from egp_onnx.entropy import ChannelCounts, Statistics
from egp_onnx.errors import CalibrationError, ConfigError, one_line

STATS_FORMAT = 1


def model_fingerprint(model: onnx.ModelProto) -> str:
    """A digest of the graph and its weights: statistics belong to exactly one model."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    return hashlib.sha256(copy.graph.SerializeToString(deterministic=True)).hexdigest()


def statistics_bytes(stats: Statistics, fingerprint: str) -> bytes:
    """Counts as the bytes of an .npz that `--stats` reads back and merges."""
    names = sorted(stats.counts)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(STATS_FORMAT),
        "fingerprint": np.array(fingerprint),
        "samples": np.array(stats.samples),
        "rectifiers": np.array(names),
    }
    for i, name in enumerate(names):
        arrays[f"on_{i}"] = stats.counts[name].on.astype(np.int64)
        arrays[f"total_{i}"] = np.array(stats.counts[name].total, dtype=np.int64)
    buffer = io.BytesIO()
    savez: Any = np.savez  # numpy's stub reads **arrays as its allow_pickle flag
    savez(buffer, **arrays)
    return buffer.getvalue()


def stats_paths(paths: object) -> list[str | os.PathLike[str]]:
    """``paths`` as a list of files: one path alone (a str) counts as one file, not as its characters.

    Raises:
        ConfigError: ``paths`` is neither a path nor a sequence of paths.

    """
    if isinstance(paths, str | os.PathLike):
        return [paths]
    if not isinstance(paths, Sequence | set | frozenset) or not all(
        isinstance(p, str | os.PathLike) for p in paths
    ):
        raise ConfigError(f"stats takes a path or a list of paths, got {type(paths).__name__}")
    return list(paths)


def _scalar(npz: Any, key: str, path: object, kind: str) -> Any:
    """The 0-d field ``key`` of a statistics file, of numpy dtype kind ``kind`` ('i', 'U')."""
    value = npz[key]
    if value.ndim != 0 or value.dtype.kind not in (kind + "u" if kind == "i" else kind):
        raise CalibrationError(
            f"{path}: field '{key}' is {value.dtype} {value.shape}, not one {_KINDS[kind]}"
        )
    return value.item()


_KINDS = {"i": "integer", "U": "string"}


def _part(npz: Any, path: object, fingerprint: str) -> Statistics:
    """One statistics file's counts, every field checked (the model's channel counts are checked later)."""
    version = _scalar(npz, "format", path, "i")
    if version != STATS_FORMAT:
        raise CalibrationError(f"{path}: statistics format {version} is not supported")
    if _scalar(npz, "fingerprint", path, "U") != fingerprint:
        raise CalibrationError(f"{path}: these statistics were computed for another model (or other weights)")
    samples = _scalar(npz, "samples", path, "i")
    if samples < 1:
        raise CalibrationError(f"{path}: the sample count is {samples}; a statistics file counts at least 1")
    names_array = npz["rectifiers"]
    if names_array.ndim != 1 or names_array.dtype.kind != "U":
        raise CalibrationError(f"{path}: field 'rectifiers' is not a list of names")
    names = [str(n) for n in names_array]
    if len(set(names)) != len(names):
        raise CalibrationError(f"{path}: a rectifier is listed twice")
    counts = {}
    for i, name in enumerate(names):
        on, total = npz[f"on_{i}"], _scalar(npz, f"total_{i}", path, "i")
        if on.ndim != 1 or on.dtype.kind not in "iu":
            raise CalibrationError(
                f"{path}: the ON counts of {name} are {on.dtype} {on.shape}, not one integer per channel"
            )
        if total < 0 or (on < 0).any() or (on > total).any():
            raise CalibrationError(
                f"{path}: the ON counts of {name} lie outside [0, {total}], the events counted per channel"
            )
        counts[name] = ChannelCounts(on.astype(np.int64), int(total))
    return Statistics(counts, int(samples))


def _check_channels(part: Statistics, channels: Mapping[str, int | None], path: object) -> None:
    if channels.keys() != part.counts.keys():
        raise CalibrationError(
            f"{path}: its rectifiers are not this model's (nor those of the files before it)"
        )
    for name, counts in part.counts.items():
        want = channels[name]
        if want is not None and counts.on.size != want:
            raise CalibrationError(
                f"{path}: it counts {counts.on.size} channels for {name}, which has {want}"
            )


def load_statistics(
    paths: Sequence[str | os.PathLike[str]],
    fingerprint: str,
    channels: Mapping[str, int | None] | None = None,
) -> Statistics:
    """Read and merge statistics files written by `egp-onnx stats` for the same model.

    Every field is checked (types, shapes, 0 <= ON <= events, at least one sample), and a file
    whose content was already given is refused: merging it twice would count its samples twice.
    ``channels``: the model's rectifiers and their channel counts (None where unknown); every file
    must count exactly these.

    Raises:
        CalibrationError: a file is missing, unreadable, malformed, given twice, or was computed
            for another model.

    """
    merged: Statistics | None = None
    seen: dict[str, object] = {}
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError as exc:
            raise CalibrationError(f"statistics file not found: {path}") from exc
        except OSError as exc:
            raise CalibrationError(f"cannot read statistics file {path}: {one_line(exc)}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            raise CalibrationError(
                f"{path} holds the same statistics as {seen[digest]}; each sample may be counted once"
            )
        seen[digest] = path
        if not data.startswith(b"PK"):  # every .npz is a zip archive
            raise CalibrationError(f"{path} is not a statistics file (egp-onnx stats writes them)")
        try:
            loaded = np.load(io.BytesIO(data), allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise KeyError("format")  # a lone .npy array
            with loaded as npz:
                part = _part(npz, path, fingerprint)
        except KeyError as exc:
            raise CalibrationError(f"{path} is not a statistics file (egp-onnx stats writes them)") from exc
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, TypeError) as exc:
            raise CalibrationError(f"cannot read statistics file {path}: {one_line(exc)}") from exc
        if channels is None and merged is not None:
            channels = {name: counts.on.size for name, counts in merged.counts.items()}
        if channels is not None:
            _check_channels(part, channels, path)
        merged = part if merged is None else merged.merged(part)
    if merged is None:
        raise CalibrationError("no statistics files given")
    return merged
