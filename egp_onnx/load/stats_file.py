"""Statistics files: ON counts as an .npz that ``egp-onnx stats`` writes and ``--stats`` merges."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from egp_onnx.entropy import ChannelCounts, Statistics
from egp_onnx.errors import CalibrationError, one_line

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


def load_statistics(paths: Sequence[str | os.PathLike[str]], fingerprint: str) -> Statistics:
    """Read and merge statistics files written by `egp-onnx stats` for the same model.

    Raises:
        CalibrationError: a file is missing, unreadable, or was computed for another model.

    """
    merged: Statistics | None = None
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as npz:
                if int(npz["format"]) != STATS_FORMAT:
                    raise CalibrationError(f"{path}: statistics format {int(npz['format'])} is not supported")
                if str(npz["fingerprint"]) != fingerprint:
                    raise CalibrationError(
                        f"{path}: these statistics were computed for another model (or other weights)"
                    )
                names = [str(n) for n in npz["rectifiers"]]
                counts = {
                    n: ChannelCounts(npz[f"on_{i}"], int(npz[f"total_{i}"])) for i, n in enumerate(names)
                }
                part = Statistics(counts, int(npz["samples"]))
        except KeyError as exc:
            raise CalibrationError(
                f"{path} is not a statistics file (egp-onnx stats writes them)"
            ) from exc
        except FileNotFoundError as exc:
            raise CalibrationError(f"statistics file not found: {path}") from exc
        except (OSError, ValueError, EOFError) as exc:
            raise CalibrationError(f"cannot read statistics file {path}: {one_line(exc)}") from exc
        merged = part if merged is None else merged.merged(part)
    if merged is None:
        raise CalibrationError("no statistics files given")
    return merged
