"""Loading models and writing outputs atomically."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from egp_onnx.entropy import ChannelCounts, Statistics
from egp_onnx.errors import CalibrationError, ModelError, OutputError, one_line
from egp_onnx.graph.topology import serialized_size, shape_skeleton, split_weights
from egp_onnx.load.normalize import normalize


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read, check and shape-infer an ONNX model; the file itself is never modified.

    Unnamed nodes get deterministic names (``OpType_index``) so that reports can name them.

    Raises:
        ModelError: the file is missing, unreadable, not an ONNX model, or fails onnx.checker.

    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelError(f"model path is not a file: {p}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {p}: {exc.strerror}") from exc
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{p} is not an ONNX model (protobuf parse failed: {exc})") from exc
    if model.ir_version == 0 or not model.graph.node:
        raise ModelError(f"{p} is not an ONNX model (no IR version or no graph nodes)")
    external = bool(external_data_files(model, p))  # checks every location before onnx reads one
    try:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"cannot load external data of {p}: {one_line(exc)}") from exc
    return prepare_model(model, source=str(p), serialized=None if external else data, in_place=True)


def external_data_files(model: onnx.ModelProto, path: str | os.PathLike[str]) -> list[Path]:
    """The files that hold the external data of ``model`` (read from ``path``), checked.

    Raises:
        ModelError: a location points outside the model's folder, or its file is missing.

    """
    model_path = Path(path)
    folder = model_path.parent.resolve()
    files: dict[Path, None] = {}
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise ModelError(
                f"{model_path}: tensor '{tensor.name}' keeps its data at {location!r}, outside the "
                "model's folder; move the file beside the model and give its bare name as location"
            )
        if not target.is_file():
            raise ModelError(
                f"{model_path}: external data file {location} of tensor '{tensor.name}' not found "
                f"beside the model (in {model_path.parent})"
            )
        files[target] = None
    return list(files)


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and attribute tensors of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def prepare_model(
    model: onnx.ModelProto, source: str = "model", serialized: bytes | None = None, in_place: bool = False
) -> onnx.ModelProto:
    """Return a checked, normalised, shape-inferred copy of ``model`` with every node named.

    Normalisation (:func:`egp_onnx.load.normalize.normalize`) folds constant subexpressions into
    initializers and takes initializers out of the graph inputs. ``serialized`` is ``model``'s
    own bytes when the caller has them: the checker reads those instead of serialising it again.
    ``in_place`` prepares ``model`` itself when normalisation changes nothing (for a model nobody
    else holds, such as one just parsed from a file): no copy of its weights.
    """
    try:
        onnx.checker.check_model(model if serialized is None else serialized)  # reads only
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelError(f"{source} fails onnx.checker: {one_line(exc)}") from exc
    normalized = normalize(model)
    try:
        # Inference needs the weights' shapes, not their values: it runs on the graph without them
        # (a weight-sized serialisation less each way) and its value_info goes onto our copy.
        inferred = onnx.shape_inference.infer_shapes(shape_skeleton(normalized, keep_value_info=True))
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{source}: ONNX shape inference failed: {one_line(exc)}") from exc
    copy = normalized
    if copy is model and not in_place:  # normalize changed nothing, so the copy is still to be made
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(inferred.graph.value_info)
    name_nodes(copy.graph)
    return copy


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a unique, deterministic name (in place, on our own copy)."""
    taken = {n.name for n in graph.node if n.name}
    for index, node in enumerate(graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{index}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)


#: TensorProto's value fields: onnx.checker wants exactly one of them set on a non-empty tensor.
_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def checked_split(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``split_weights(model)``, once onnx.checker has passed ``model``, without serialising its weights.

    The checker runs on the split model with the weights as typed graph inputs (serialising a
    575 MB model for it took 2.4 s of 3). What it checks on those initializers is checked here:
    exactly one value field, and a known type whose values fill the shape; numpy_helper.to_array,
    which took them out, accepts exactly dims x item size bytes of raw_data (the checker: at least).

    Raises:
        onnx.checker.ValidationError: ``model`` is not a valid model.

    """
    try:
        stubbed, weights = split_weights(model)
    except (ValueError, TypeError) as exc:  # to_array: a size that does not fit the shape, an unknown type
        raise onnx.checker.ValidationError(f"an initializer cannot be read: {one_line(exc)}") from exc
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            fields = [f for f in _VALUE_FIELDS if len(getattr(tensor, f))]
            if len(fields) + tensor.HasField("raw_data") != 1:
                raise onnx.checker.ValidationError(
                    f"TensorProto (tensor name: {tensor.name}) should contain one and only one value field."
                )
    checkable = onnx.ModelProto()
    checkable.CopyFrom(stubbed)  # the stubs hold no values: a copy of the graph only
    graph = checkable.graph
    inputs = {i.name for i in graph.input}
    stubs = [t for t in graph.initializer if t.name in weights]
    kept = [t for t in graph.initializer if t.name not in weights]
    graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in stubs if t.name not in inputs
    )
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(checkable)
    return stubbed, weights


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, new_file_mode())  # mkstemp makes 0600; outputs get the usual umask mode
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_file_mode() -> int:
    """The mode a new file gets under the current umask (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: A protobuf message cannot exceed 2 GiB; models near that size keep their weights outside.
PROTOBUF_LIMIT = 2**31 - 2**24


def external_data_path(path: str | os.PathLike[str]) -> Path:
    """Where the weights of a model saved with external data go: OUT.data beside OUT."""
    target = Path(path)
    return target.with_name(target.name + ".data")


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], external: bool | None = None, force: bool = False
) -> None:
    """Write ``model`` atomically; with external data when asked or when it would not fit one protobuf.

    Args:
        model: the model (not modified).
        path: the output file.
        external: True to keep the weights in ``path + ".data"``; None decides by size.
        force: overwrite an existing ``.data`` file.

    """
    if external is None:
        external = serialized_size(model) > PROTOBUF_LIMIT
    if external:
        return _save_with_external_data(model, Path(path), force)
    try:
        data = model.SerializeToString(deterministic=True)
    except ValueError as exc:
        raise OutputError(f"cannot serialize the model for {path}: {exc}") from exc
    try:
        write_bytes_atomic(path, data)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc


def _save_with_external_data(model: onnx.ModelProto, target: Path, force: bool) -> None:
    """Write the weights to OUT.data and the graph to OUT, each by rename from a private folder."""
    data_path = external_data_path(target)
    if data_path.exists() and not force:
        raise OutputError(f"external data file {data_path} exists; pass --force to overwrite it")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(
            copy,
            str(staging / target.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=0,
        )
        mode = new_file_mode()
        for name in (data_path.name, target.name):
            if (staging / name).exists():
                os.chmod(staging / name, mode)
        if (staging / data_path.name).exists():
            os.replace(staging / data_path.name, data_path)
        os.replace(staging / target.name, target)
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot write {target} with external data: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write a text file (a report) atomically."""
    try:
        write_bytes_atomic(path, text.encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc


STATS_FORMAT = 1


def model_fingerprint(model: onnx.ModelProto) -> str:
    """A digest of the graph and its weights: statistics belong to exactly one model."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    return hashlib.sha256(copy.graph.SerializeToString(deterministic=True)).hexdigest()


def save_statistics(stats: Statistics, fingerprint: str, path: str | os.PathLike[str]) -> None:
    """Write counts as an .npz that `--stats` reads back and merges (atomically)."""
    try:
        write_bytes_atomic(path, statistics_bytes(stats, fingerprint))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc


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
