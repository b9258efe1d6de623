"""Loading models, and writing files atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from egp_onnx.errors import ModelError, one_line
from egp_onnx.graph.walk import subgraphs
from egp_onnx.graph.weights import shape_skeleton, split_weights
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
    external = bool(external_data_files(model, p))  # checks every location before one is read
    try:
        _load_external_data(model, p.parent)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load external data of {p}: {one_line(exc)}") from exc
    return prepare_model(model, source=str(p), serialized=None if external else data, in_place=True)


def external_data_files(model: onnx.ModelProto, path: str | os.PathLike[str]) -> list[Path]:
    """The files that hold the external data of ``model`` (read from ``path``), checked.

    A location must name a file inside the model's folder as written ("w.bin", "weights/w.bin");
    that file may be a symlink to one elsewhere (the user put it there, the model did not).

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
        # The location is judged as written, so a symlink the user put beside the model is followed,
        # while a model cannot name a file outside its folder ("../x", "/etc/x", "a/../../x").
        inside = os.path.normpath(location) if location else ""
        target = (folder / location).resolve()
        if not inside or Path(location).is_absolute() or inside == ".." or inside.startswith(".." + os.sep):
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


def _load_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Read every external tensor's bytes into the tensor, from locations already checked.

    Read here rather than by onnx's loader, which refuses a location that is a symlink: a user
    who links a weights file beside the model means it (external_data_files keeps the model itself
    from naming a file outside its folder).
    """
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        offset, length = int(info.get("offset") or 0), info.get("length")
        with open(folder / info["location"], "rb") as handle:
            handle.seek(offset)
            data = handle.read(int(length)) if length else handle.read()
        if length and len(data) != int(length):
            raise ValueError(
                f"tensor '{tensor.name}' wants {length} bytes at offset {offset} of {info['location']}, "
                f"the file holds {len(data)}"
            )
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and attribute tensors of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
        for body in subgraphs(node):
            yield from _all_tensors(body)


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
        # The model's own value_info is a hint that may disagree with its graph (a stale shape, a
        # wrong type): inference starts without it, and only what it cannot infer is taken from it.
        inferred = onnx.shape_inference.infer_shapes(shape_skeleton(normalized))
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{source}: ONNX shape inference failed: {one_line(exc)}") from exc
    copy = normalized
    if copy is model and not in_place:  # normalize changed nothing, so the copy is still to be made
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
    hints = {v.name: v for v in copy.graph.value_info}
    merged = []
    for value in inferred.graph.value_info:
        shaped = value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")
        hint = hints.pop(value.name, None)
        merged.append(hint if hint is not None and not shaped else value)
    merged += hints.values()  # tensors inference knows nothing about (e.g. outputs of custom ops)
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(merged)
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

    The checker runs on the split model with the weights as typed graph inputs, so a large
    model's weights are never serialised for it. What it checks on those initializers is checked here:
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


def name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system of ``folder`` takes."""
    try:
        return os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no such folder yet
        return 255


#: Temporaries are named .NAME.PID.XXXXXXXX.tmp: PID says whether the run that made them is alive.
TMP_SUFFIX = ".tmp"


def temporary_prefix(target: Path) -> str:
    """The prefix of ``target``'s temporaries: .NAME.PID. (mkstemp adds 8 characters and .tmp).

    A NAME so long that the temporary's name would pass the file system's limit is shortened and
    made unique again with a digest of the full name: a legal output name always has a legal
    temporary beside it.
    """
    pid = str(os.getpid())
    room = name_max(target.parent) - len(pid) - 3 - 8 - len(TMP_SUFFIX)
    name = os.fsencode(target.name)
    if len(name) > room:
        digest = hashlib.sha256(name).hexdigest()[:8]
        name = name[: room - 9].decode(errors="ignore").encode() + b"~" + digest.encode()
    return f".{os.fsdecode(name)}.{pid}."


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(target), suffix=TMP_SUFFIX, dir=target.parent)
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
