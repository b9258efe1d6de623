"""Loading user code named on the command line: `module:attribute` or `path/to/file.py:attribute`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from egp_onnx.errors import ConfigError


def load_attribute(spec: str, option: str) -> Any:
    """The object ``spec`` names; the module is imported from the current folder or a file path.

    Raises:
        ConfigError: ``spec`` is malformed, or its module or attribute cannot be loaded.

    """
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{option} takes module:function or file.py:function, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"{option}: no file {path}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ConfigError(f"{option}: cannot import {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.path.insert(0, str(path.resolve().parent))  # its sibling modules import as usual
            loader_spec.loader.exec_module(module)
        else:
            if str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:  # the user's module may fail in any way while importing
        raise ConfigError(f"{option}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ConfigError(f"{option}: {module_name} has no attribute {attribute}") from exc


def source_file(spec: str | None) -> Path | None:
    """The file a ``module:attribute`` spec loads code from, found without running any of it.

    Looks where :func:`load_attribute` imports from: the named file, else the current folder,
    else (top-level modules only) the import path. None when it cannot be told.
    """
    if not spec:
        return None
    module_name = spec.rpartition(":")[0]
    if module_name.endswith(".py"):
        return Path(module_name)
    if not module_name:
        return None
    local = Path.cwd().joinpath(*module_name.split("."))
    for candidate in (local.with_suffix(".py"), local / "__init__.py"):
        if candidate.is_file():
            return candidate
    if "." in module_name:
        return None  # finding a submodule would import (run) its package
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    origin = found.origin if found is not None else None
    return Path(origin) if origin and Path(origin).is_file() else None
