"""The outputs of a run: checked against every input before any work, committed together at the end.

A run first plans its outputs (:func:`plan_outputs`): no output may be a file the run reads
(compared by file identity, so symlinks and hard links count) or lie inside a folder it reads,
and an existing output needs ``force``; ``force`` never licenses overwriting an input. Then an
:class:`OutputWriter` stages every output as a temporary file beside its target and, once all are
written, commits them. Without ``force`` each target is created exclusively (a hard link of the
temporary file), so an output that appeared while the run worked is not clobbered, and then
nothing is committed; with ``force`` the targets are replaced.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import onnx

from egp_onnx.errors import OutputError
from egp_onnx.graph.weights import serialized_size
from egp_onnx.load.model import (
    PROTOBUF_LIMIT,
    TMP_SUFFIX,
    external_data_files,
    external_data_path,
    name_max,
    new_file_mode,
    temporary_prefix,
)

log = logging.getLogger(__name__)

#: The targets the current run has committed (set by cli/run.py): an interrupt that lands after a
#: commit must not say that nothing was written.
committed: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("committed", default=None)

PathLike = str | os.PathLike[str]

#: errno values that mean "this file system makes no hard links": commit falls back to O_EXCL.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


@dataclass(frozen=True)
class InputPath:
    """A path the run reads, and the option that named it (``MODEL``, ``--calib``, ...)."""

    option: str
    path: Path
    resolved: Path
    identity: tuple[int, int] | None  # (st_dev, st_ino); None when the path does not exist
    folder: bool

    def describe(self) -> str:
        """How an error message names this input."""
        if self.option == "MODEL":
            return "the input file"
        if self.folder:
            return f"inside the folder given to {self.option}"
        return f"the input file of {self.option}"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def input_path(option: str, path: PathLike) -> InputPath:
    """An input, resolved through symlinks, with its file identity (for hard links)."""
    p = Path(path)
    return InputPath(option, p, p.resolve(), _identity(p), p.is_dir())


def _mentions(path: PathLike, needle: bytes) -> bool:
    """True when the file's bytes contain ``needle`` (a scan, without parsing or copying the file)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return False
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return view.find(needle) >= 0


def model_inputs(path: PathLike, option: str = "MODEL") -> list[InputPath]:
    """The model file and the files that hold its external data.

    A model that cannot be read gives only its own path: loading it reports the problem later.
    """
    if Path(path).is_dir():
        return []  # not a model: loading it says so
    found = [input_path(option, path)]
    with contextlib.suppress(Exception):  # a bad model is reported in one line when it is loaded
        if not _mentions(path, b"location"):
            return found  # no external_data entry names a file: not worth parsing a large model to learn that
        model = onnx.load_model(str(path), load_external_data=False)
        found += [input_path(f"the external data of {option}", f) for f in external_data_files(model, path)]
    return found


@dataclass(frozen=True)
class OutputPlan:
    """The checked outputs of one run and the inputs they must never overwrite."""

    outputs: tuple[Path, ...]
    inputs: tuple[InputPath, ...]
    force: bool

    def conflict(self, target: PathLike) -> InputPath | None:
        """The input that writing ``target`` would overwrite (or add a file to), if any."""
        path = Path(target)
        resolved, identity = path.resolve(), _identity(path)
        for item in self.inputs:
            if item.folder:
                if resolved.is_relative_to(item.resolved):
                    return item
            elif resolved == item.resolved or (identity is not None and identity == item.identity):
                return item
        if identity is not None and path.stat().st_nlink > 1:
            # A hard link to a file inside an input folder: only then are the folders walked.
            for item in self.inputs:
                if item.folder and any(_identity(f) == identity for f in item.path.rglob("*") if f.is_file()):
                    return item
        return None


def plan_outputs(
    outputs: Iterable[PathLike | None],
    inputs: Iterable[InputPath],
    force: bool,
    possible: Iterable[PathLike] = (),
) -> OutputPlan:
    """Check the output paths of a run before any work starts.

    Args:
        outputs: the files the run will write (None entries are options not given).
        inputs: every path the run reads.
        force: whether existing outputs may be replaced (inputs never are).
        possible: files the run may write (e.g. OUT.data): checked against the inputs and the
            other outputs, but they may exist (the commit refuses them without ``force``).

    Raises:
        OutputError: an output is an input or inside an input folder, is given twice, is a
            folder, exists without ``force``, its name is longer than the file system allows, or
            its folder is missing or not writable.

    """
    plan = OutputPlan(tuple(Path(p) for p in outputs if p is not None), tuple(inputs), force)
    seen: set[Path] = set()
    for out, required in [*((p, True) for p in plan.outputs), *((Path(p), False) for p in possible)]:
        if required:
            _check_name_length(out)
        item = plan.conflict(out)
        if item is not None:
            raise OutputError(f"output {out} is {item.describe()}; choose another output path")
        target = out.resolve()
        if target in seen:
            raise OutputError(f"output path {out} is given twice")
        seen.add(target)
        if not required:
            continue
        if target.is_dir():
            raise OutputError(f"output {out} is a directory; give a file path")
        if target.exists() and not force:
            raise OutputError(f"output {out} exists; pass --force to overwrite it")
        folder = target.parent
        if not folder.is_dir():
            raise OutputError(f"output folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise OutputError(f"output folder {folder} is not writable")
    return plan


def _check_name_length(out: Path) -> None:
    limit, length = name_max(out.parent), len(os.fsencode(out.name))
    if length > limit:
        raise OutputError(
            f"output name {out.name[:40]}... is {length} bytes long; the file system allows {limit}"
        )


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries of ``target`` left by runs that are no longer alive (e.g. SIGKILLed).

    Only names of our own pattern (.NAME.PID.XXXXXXXX.tmp, NAME as :func:`_tmp_prefix` writes
    it) whose PID is not a running process are removed; a run still working on the same target
    keeps its temporaries. Returns what was removed.
    """
    stem = temporary_prefix(target)[: -len(str(os.getpid())) - 1]  # .NAME.
    removed = []
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            name = entry.name
            if not (name.startswith(stem) and name.endswith(TMP_SUFFIX)):
                continue
            pid, _, rest = name[len(stem) : -len(TMP_SUFFIX)].partition(".")
            if not pid.isdigit() or len(rest) != 8 or _alive(int(pid)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process is alive
        return True
    return True


class OutputWriter:
    """Stages the outputs of a run beside their targets, then commits all of them at once.

    Use it as a context manager: temporaries that were not committed are removed on the way
    out, so an error or an interrupt leaves no partial file.
    """

    def __init__(self, plan: OutputPlan) -> None:
        self.plan = plan
        self._staged: list[tuple[Path, Path]] = []  # (temporary, target)
        self._scratch: list[Path] = []  # temporary files and folders to remove at the end

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.discard()

    def _clean(self, target: Path) -> None:
        for stale in remove_stale_temporaries(target):
            log.info("removed %s, a temporary of an earlier run that did not finish", stale)

    def write_bytes(self, target: PathLike, data: bytes) -> None:
        """Stage ``data`` for ``target``."""
        path = Path(target)
        try:
            self._clean(path)
            fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
            self._scratch.append(Path(tmp))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, new_file_mode())  # mkstemp makes 0600; outputs get the usual umask mode
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
        self._staged.append((Path(tmp), path))

    def write_model(self, model: onnx.ModelProto, target: PathLike, external: bool | None = None) -> None:
        """Stage ``model`` for ``target``; its weights go to ``target.data`` when ``external``.

        ``external=None`` keeps the weights outside only when the model would not fit one protobuf.
        """
        path = Path(target)
        if external is None:
            external = serialized_size(model) > PROTOBUF_LIMIT
        if not external:
            try:
                data = model.SerializeToString(deterministic=True)
            except ValueError as exc:
                raise OutputError(f"cannot serialize the model for {path}: {exc}") from exc
            self.write_bytes(path, data)
            return
        data_path = external_data_path(path)
        try:
            self._clean(path)
            prefix = temporary_prefix(path)
            staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=TMP_SUFFIX, dir=path.parent))
            self._scratch.append(staging)
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # onnx.save_model rewrites the proto it is given
            onnx.save_model(
                copy,
                str(staging / path.name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_path.name,
                size_threshold=0,
            )
            for name, final in ((data_path.name, data_path), (path.name, path)):
                if (staging / name).exists():
                    os.chmod(staging / name, new_file_mode())
                    self._staged.append((staging / name, final))
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot write {path} with external data: {exc}") from exc

    def commit(self) -> list[Path]:
        """Move every staged output into place and return the targets.

        Raises:
            OutputError: a target became an input, or (without ``force``) appeared while the
                run worked; then no output is committed.

        """
        for _, target in self._staged:
            item = self.plan.conflict(target)
            if item is not None:
                raise OutputError(f"output {target} is now {item.describe()}; nothing written")
        created: list[Path] = []
        target = Path()
        try:
            for tmp, target in self._staged:
                if self.plan.force:
                    os.replace(tmp, target)
                else:
                    _create_exclusive(tmp, target)
                    created.append(target)
        except FileExistsError as exc:
            _remove(created)
            raise OutputError(
                f"output {target} appeared while egp-onnx ran; pass --force to overwrite it; nothing written"
            ) from exc
        except OSError as exc:
            _remove(created)
            raise OutputError(f"cannot write {target}: {exc.strerror}") from exc
        except BaseException:  # an interrupt between two targets: none of them stays
            _remove(created)
            raise
        targets = [t for _, t in self._staged]
        written = committed.get()
        if written is not None:
            written.extend(targets)
        self._staged = []
        self.discard()
        return targets

    def discard(self) -> None:
        """Remove the temporaries (committed targets stay)."""
        for path in reversed(self._scratch):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self._scratch = []
        self._staged = []


def _create_exclusive(tmp: Path, target: Path) -> None:
    """Give ``tmp``'s content the name ``target``, which must not exist (FileExistsError)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # claims the name
        os.close(fd)
        os.replace(tmp, target)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
