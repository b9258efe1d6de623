"""The rewrite registry: today's order, skip names checked, and one name per report kind."""

from __future__ import annotations

import ast
import json
import pkgutil
import re
from pathlib import Path

import pytest
from models import Builder, conv_bn_relu
from surgery_checks import ops

import egp_onnx.surgery.rewrites as package
from egp_onnx.errors import ConfigError
from egp_onnx.surgery import registry, simplify
from egp_onnx.surgery.registry import REWRITES, RewriteSpec, register_rewrite, rewrites

ROOT = Path(__file__).resolve().parents[2]


def kinds() -> list[str]:
    return [kind for spec in rewrites() for kind in spec.kinds]


def test_the_rewrites_run_in_the_order_simplify_has_always_used():
    specs = rewrites()
    assert [s.name for s in specs] == [
        "fold_bn",
        "remove_rectifier",
        "fold_constant",
        "merge",
        "fold_residual",
    ]
    assert [s.order for s in specs] == sorted(s.order for s in specs)
    assert [s.name for s in rewrites(skip={"merge", "fold_bn"})] == [
        "remove_rectifier",
        "fold_constant",
        "fold_residual",
    ]


def test_an_unknown_skip_name_is_a_config_error_naming_the_rewrites(rng):
    valid = "fold_bn, remove_rectifier, fold_constant, merge, fold_residual"
    with pytest.raises(ConfigError, match=f"cannot skip rewrite fuse: the rewrites are {valid}"):
        rewrites(skip=["fuse", "merge"])
    with pytest.raises(
        ConfigError, match=r"zero_off_channels \(zero_off_channels is a step of remove_rectifier\)"
    ):
        simplify(conv_bn_relu(rng), {}, skip=["zero_off_channels"])


def test_the_kinds_are_unique_and_are_the_report_schemas():
    assert len(kinds()) == len(set(kinds()))
    schema = json.loads((ROOT / "docs" / "compress-report.schema.json").read_text())
    # a rewrite's properties (fidelity's outputs have a kind of their own)
    rewrites = [node for node in _walk(schema) if isinstance(node.get("kind"), dict) and "applied" in node]
    enums = [node["kind"]["enum"] for node in rewrites]
    assert enums == [kinds()]


def test_the_licences_are_the_readmes():
    """The README's depth-reduction table: | `kind`: what it does | licensed by | exact? |"""
    rows = re.findall(r"^\| `(\w+)`: .*? \| (\w+) \|", (ROOT / "README.md").read_text(), re.MULTILINE)
    licence = {kind: spec.licence for spec in rewrites() for kind in spec.kinds}
    assert dict(rows) == licence


def test_each_kind_is_spelled_once_in_the_package():
    """As a string only where its module names it; records refer to that name."""
    every = set(kinds())
    spelled = [
        (path.relative_to(ROOT).as_posix(), node.value)
        for path in sorted((ROOT / "egp_onnx").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in every
    ]
    assert sorted(value for _, value in spelled) == sorted(every)
    assert {path for path, _ in spelled} == {f"egp_onnx/surgery/rewrites/{m}.py" for m in _modules()}


def test_each_rewrite_module_registers_one_rewrite_and_records_only_its_kinds():
    specs = {spec.apply.__module__: spec for spec in rewrites()}
    assert set(specs) == {f"{package.__name__}.{m}" for m in _modules()}
    for module, spec in specs.items():
        tree = ast.parse(Path(package.__path__[0], module.rsplit(".", 1)[1] + ".py").read_text())
        names = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        recorded = [
            call.args[0]
            for call in ast.walk(tree)
            if isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == "record"
        ]
        assert recorded and all(isinstance(arg, ast.Name) for arg in recorded)
        assert {names[arg.id] for arg in recorded} == set(spec.kinds)


def test_register_rewrite_refuses_a_name_an_order_or_a_licence_twice(monkeypatch):
    monkeypatch.setattr(registry, "REWRITES", dict(REWRITES))
    with pytest.raises(ValueError, match="registered twice"):
        register_rewrite("merge", order=99, licence="algebra")(lambda s: False)
    with pytest.raises(ValueError, match="registered twice"):
        register_rewrite("other", order=99, licence="algebra", steps=("zero_off_channels",))(lambda s: False)
    with pytest.raises(ValueError, match="order 10 is taken"):
        register_rewrite("other", order=10, licence="algebra")(lambda s: False)
    with pytest.raises(ValueError, match="licence 'luck'"):
        register_rewrite("other", order=99, licence="luck")(lambda s: False)  # type: ignore[arg-type]


def test_simplify_starts_again_from_the_first_rewrite_after_each_change(rng, monkeypatch):
    calls = []

    def rewrite(name: str, changes: int):
        def apply(s) -> bool:
            calls.append(name)
            return calls.count(name) <= changes

        return apply

    fakes = [RewriteSpec("a", 1, "algebra", rewrite("a", 0)), RewriteSpec("b", 2, "algebra", rewrite("b", 2))]
    monkeypatch.setattr(registry, "REWRITES", {spec.name: spec for spec in fakes})
    simplify(conv_bn_relu(rng), {})
    assert calls == ["a", "b", "a", "b", "a", "b"]
    calls.clear()
    simplify(conv_bn_relu(rng), {}, skip=["a"])
    assert calls == ["b", "b", "b"]


def test_skipping_every_rewrite_leaves_the_model_as_it_is(rng):
    b = Builder(rng)
    model = b.model(b.conv(b.bn(b.conv("x", "A", 3, 4, 3, pad=1), "bn", 4), "B", 4, 2, 1), ["N", 3, 6, 6])
    result = simplify(model, {}, skip=list(REWRITES))
    assert ops(result.model) == ops(model) and not result.rewrites and not result.states
    assert simplify(model, {}).rewrites, "fold_bn and merge apply when they are not skipped"


def _modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(package.__path__)]


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
