"""The package's dependency rules, read off every module's imports with ast.

Each stage of the pipeline is a package (a part); what a module may import is decided by the part
it lives in. Each third-party backend has one home, so that upgrading or replacing it touches one
folder; the numerical core imports numpy alone. Imports under ``if TYPE_CHECKING:`` are left out:
they name types for the checker and run nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "egp_onnx"

#: Third-party packages, and the one part of egp_onnx that may import each.
HOMES = {
    "onnxruntime": "runtime",
    "onnx_graphsurgeon": "surgery",
    "click": "cli",
    "torch": "integrations",
    "matplotlib": "report",
    "PIL": "load",
    "distributed": "runtime",  # runtime/cluster.py, the optional egp-onnx[dask]
    "dask": "runtime",
}

#: The parts of egp_onnx each part may import, lowest first; a part may always import itself.
#: Stages import the stages before them in the pipeline, never one beside or after them; the
#: exceptions are named in EXCEPTIONS.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "entropy": set(),
    "config": {"errors"},
    "report": {"errors", "config"},  # records and their rendering: built from records, never from models
    "graph": {"errors"},
    "runtime": {"errors", "graph"},
    "load": {"errors", "graph", "entropy", "runtime"},
    "calibrate": {"errors", "graph", "entropy", "runtime", "load"},
    "prune": {"errors", "config", "graph", "entropy", "load", "report"},
    "reconstruct": {"errors", "graph", "runtime", "load", "report", "prune"},
    "surgery": {"errors", "graph", "report"},
    "verify": {"errors", "config", "graph", "runtime", "load", "report"},
    "integrations": {"errors", "graph", "load", "runtime"},  # runtime: the distillation teacher
    "api": {
        "errors", "config", "entropy", "report", "graph", "runtime", "load", "calibrate", "prune",
        "reconstruct", "surgery", "verify",
    },
    "cli": {
        "errors", "config", "entropy", "report", "graph", "runtime", "load", "verify", "api",
        "integrations", "",
    },
    "": {"errors", "report", "api"},  # egp_onnx/__init__.py: the public names
    "__main__": {"cli"},
}  # fmt: skip

#: Single modules that may import beyond their part's rule, and why.
EXCEPTIONS: dict[str, set[str]] = {
    # the EGP loop composes the stages of one step, as NNCF's pipeline composes algorithms
    "egp_onnx.prune.loop": {"calibrate", "reconstruct", "verify"},
    # constant folding at load time is graph-surgeon's (its onnxruntime sessions silenced first)
    "egp_onnx.load.normalize": {"surgery"},
}

#: Within prune, only the loop may reach the later stages; reconstruct takes only the masks.
REACHABLE_FROM = {"reconstruct": {"prune": {"egp_onnx.prune.budget", "egp_onnx.prune.permutation"}}}

#: The numerical core: pure functions on arrays, importing numpy, the standard library and each other.
PURE = {
    "egp_onnx.entropy",
    "egp_onnx.errors",
    "egp_onnx.graph.affine",
    "egp_onnx.prune.budget",
    "egp_onnx.prune.permutation",
    "egp_onnx.reconstruct.im2col",
    "egp_onnx.reconstruct.solve",
    "egp_onnx.runtime.threads",
    "egp_onnx.surgery.algebra",
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _part(module: str) -> str:
    """egp_onnx.prune.loop -> prune; egp_onnx.entropy -> entropy; egp_onnx -> "" (the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _submodule(name: str) -> str:
    """The module ``from egp_onnx import name`` imports: a submodule's name, else the package."""
    exists = (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()
    return f"egp_onnx.{name}" if exists else "egp_onnx"


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(module imported, line) of every import that runs, TYPE_CHECKING blocks left out."""
    found: list[tuple[str, int]] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            found += [item for child in node.orelse for item in _imports(ast.Module([child], []))]
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "egp_onnx":  # from egp_onnx import entropy: the module egp_onnx.entropy
                found += [(_submodule(alias.name), node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
        found += _imports(node)
    return found


EDGES = [
    (_module(path), imported, f"{path.relative_to(PACKAGE.parent)}:{line}")
    for path in sorted(PACKAGE.rglob("*.py"))
    for imported, line in _imports(ast.parse(path.read_text(), str(path)))
]


def test_the_rules_see_every_part_and_many_imports():
    parts = {_part(module) for module, _, _ in EDGES}
    assert parts <= set(ALLOWED), f"parts with no rule: {sorted(parts - set(ALLOWED))}"
    assert {"graph", "runtime", "surgery", "cli", "api"} <= parts
    assert len(EDGES) > 200  # the walk reads the package, not an empty folder


@pytest.mark.parametrize("backend", sorted(HOMES))
def test_each_backend_is_imported_in_its_home_only(backend):
    home = HOMES[backend]
    wrong = [
        where
        for module, imported, where in EDGES
        if imported.split(".")[0] == backend and _part(module) != home
    ]
    assert not wrong, f"{backend} may be imported only in egp_onnx/{home}/: {wrong}"


def test_stages_import_only_the_stages_before_them():
    wrong = []
    for module, imported, where in EDGES:
        if not imported.startswith("egp_onnx"):
            continue
        source, target = _part(module), _part(imported)
        allowed = ALLOWED[source] | {source} | EXCEPTIONS.get(module, set())
        if target not in allowed:
            wrong.append(f"{where}: {source} -> {imported}")
        reachable = REACHABLE_FROM.get(source, {}).get(target)
        if reachable is not None and imported not in reachable and module not in EXCEPTIONS:
            wrong.append(f"{where}: {source} may import only {sorted(reachable)} of {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_numerical_core_imports_numpy_and_itself_only():
    wrong = [
        f"{where}: {imported}"
        for module, imported, where in EDGES
        if module in PURE
        and imported.split(".")[0] not in {"numpy", "__future__"}
        and imported not in PURE
        and (imported.startswith("egp_onnx") or imported.split(".")[0] in {"onnx", *HOMES})
    ]
    assert not wrong, f"the pure modules import beyond numpy: {wrong}"


def test_report_is_built_from_records_not_models():
    wrong = [
        where
        for module, imported, where in EDGES
        if _part(module) == "report" and imported.startswith("onnx")
    ]
    assert not wrong, f"report/ imports onnx: {wrong}"


def test_the_rule_reader_finds_a_forbidden_import():
    # the checks above pass only if the reader sees imports where a developer would write them
    source = (
        "from typing import TYPE_CHECKING\n"
        "import onnxruntime\n"
        "def f():\n    from egp_onnx.cli import main\n"
        "if TYPE_CHECKING:\n    from egp_onnx.load import calibration\n"
    )
    found = [name for name, _ in _imports(ast.parse(source))]
    assert found == ["typing", "onnxruntime", "egp_onnx.cli"]
