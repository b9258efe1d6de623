"""The guard's verdict output by output, its default thresholds, and when it only measures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from egp_onnx.config import DEFAULT_MAX_REL_ERROR, DEFAULT_MIN_AGREEMENT, Settings
from egp_onnx.report.records import Fidelity, OutputFidelity
from egp_onnx.verify.guard import (
    Guard,
    default_thresholds,
    guard_bound,
    guard_problems,
    surgery_failures,
)


def classes(agreement: float | None, estimate: float | None = None, name: str = "logits") -> OutputFidelity:
    estimate = agreement if estimate is None else estimate
    return OutputFidelity(name, 0.5, 1.0, False, kind="classes", agreement=agreement, estimate=estimate)


def tensor(rel_error: float, allclose: bool = False, name: str = "y", kind: str = "tensor") -> OutputFidelity:
    return OutputFidelity(name, rel_error, 1.0, allclose, kind=kind)


def fidelity(*outputs: OutputFidelity, samples: int = 1000, unseen: bool = False) -> Fidelity:
    rel = max(o.rel_error for o in outputs)
    first = next((o for o in outputs if o.kind == "classes"), None)
    agreement = first.agreement if first else None
    estimate = first.estimate if first else None
    return Fidelity(agreement, rel, 1.0, None, None, samples, outputs, estimate=estimate, unseen=unseen)


def test_no_thresholds_no_problems():
    assert guard_problems(fidelity(classes(0.0), tensor(1e9)), None, None) == []


@pytest.mark.parametrize(("agreement", "passes"), [(1.0, True), (0.999, True), (0.995, True), (0.99, False)])
def test_agreement_passes_one_standard_error_above_the_threshold(agreement, passes):
    """The guard keeps a margin for the noise of its samples: 0.99 on 1000 samples is not enough."""
    problems = guard_problems(fidelity(classes(agreement)), 0.99, None)
    assert (problems == []) is passes
    if not passes:
        assert problems[0].startswith("output logits: top-1 agreement 0.9900, 0.98")
    # measured as is (verify): the agreement itself is compared
    assert guard_problems(fidelity(classes(agreement)), 0.99, None, z=0.0) == []


def test_the_margin_shrinks_with_more_samples():
    assert guard_bound(0.995, 200) < guard_bound(0.995, 2000) < 0.995
    assert guard_bound(1.0, 10) == 1.0, "no flip seen: nothing more to say"
    assert guard_problems(fidelity(classes(0.995), samples=200), 0.99, None)
    assert guard_problems(fidelity(classes(0.995), samples=5000), 0.99, None) == []


def test_the_estimate_decides_not_the_plain_agreement():
    """A step that passes plain agreement but fails the estimate of unseen agreement is rejected."""
    plain_only = fidelity(classes(1.0, estimate=0.97))
    assert guard_problems(plain_only, 0.99, None, z=0.0) == [
        "output logits: estimated unseen top-1 agreement 0.9700 (measured 1.0000) < 0.99"
    ]
    marked = fidelity(classes(0.97), unseen=True)
    assert guard_problems(marked, 0.99, None, z=0.0) == ["output logits: top-1 agreement 0.9700 < 0.99"]


def test_agreement_undefined_fails_an_agreement_guard():
    problems = guard_problems(fidelity(tensor(0.0)), 0.5, None)
    assert problems == ["top-1 agreement is undefined: no output is (N, classes) or (N, T, classes)"]


@pytest.mark.parametrize(
    ("rel_error", "problems"),
    [
        (0.05, []),
        (0.01, []),
        (0.06, ["output y: relative error 0.06 > 0.05"]),
        (float("nan"), ["output y: relative error nan > 0.05"]),
    ],
)
def test_relative_error_at_most_the_threshold_passes(rel_error, problems):
    assert guard_problems(fidelity(tensor(rel_error)), None, 0.05) == problems


def test_outputs_that_match_elementwise_pass_the_relative_error_rule():
    assert guard_problems(fidelity(tensor(0.5, allclose=True)), None, 0.05) == []


def test_every_output_is_judged_by_its_own_rule():
    """A classifier first output that agrees does not wave through a second output changed by 0.36."""
    both = fidelity(classes(1.0), tensor(0.36, name="box"), classes(0.9, name="aux"))
    problems = guard_problems(both, 0.99, 0.05)
    assert problems == [
        "output box: relative error 0.36 > 0.05",
        "output aux: top-1 agreement 0.9000, 0.8901 at 1 standard error below, < 0.99",
    ]
    sequence = OutputFidelity("chars", 0.3, 1.0, False, kind="sequence", agreement=0.98, estimate=0.98)
    assert guard_problems(fidelity(classes(1.0), sequence), 0.99, 0.05, z=0.0) == [
        "output chars: per-position agreement 0.9800 < 0.99"
    ]


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        (["classes"], (DEFAULT_MIN_AGREEMENT, None)),
        (["map"], (None, DEFAULT_MAX_REL_ERROR)),
        (["classes", "tensor"], (DEFAULT_MIN_AGREEMENT, DEFAULT_MAX_REL_ERROR)),
        (["sequence"], (DEFAULT_MIN_AGREEMENT, None)),
    ],
)
def test_default_thresholds_follow_the_outputs(kinds, expected):
    reference = SimpleNamespace(kinds=lambda: kinds)
    chosen = default_thresholds(Settings(), reference)
    assert (chosen.min_agreement, chosen.max_rel_error) == expected
    assert chosen.guarded


def test_default_thresholds_keep_the_users_and_no_guard():
    reference = SimpleNamespace(kinds=lambda: ["classes", "map"])
    assert default_thresholds(Settings(max_rel_error=0.1), reference) == Settings(max_rel_error=0.1)
    assert default_thresholds(Settings(guard=False), reference) == Settings(guard=False)
    strict = default_thresholds(Settings(min_agreement=0.995), reference)
    assert (strict.min_agreement, strict.max_rel_error) == (0.995, DEFAULT_MAX_REL_ERROR)


def test_a_guard_only_measures_without_thresholds():
    reference = SimpleNamespace()
    assert Guard(reference, Settings(guard=False), dict).measures_only
    assert Guard(reference, Settings(), dict).measures_only  # before default_thresholds
    assert not Guard(reference, Settings(min_agreement=0.9), dict).measures_only


def test_surgery_reverts_on_a_change_not_on_rounding():
    rounding = tensor(2.3e-5, allclose=False, kind="map")  # a few large elements off by more than atol
    changed = tensor(1.0, allclose=False, kind="map")  # a near-zero map, its whole signal changed
    exact = tensor(0.2, allclose=True, kind="map")
    assert surgery_failures(fidelity(rounding, changed, exact)) == [changed]
