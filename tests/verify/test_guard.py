"""The guard's verdict (guard_problems), its default thresholds, and when it only measures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from egp_onnx.config import DEFAULT_MAX_REL_ERROR, DEFAULT_MIN_AGREEMENT, Settings
from egp_onnx.report.records import Fidelity, OutputFidelity
from egp_onnx.verify.guard import Guard, default_thresholds, guard_problems


def fidelity(agreement: float | None, rel_error: float, allclose: bool = False) -> Fidelity:
    output = OutputFidelity("y", rel_error, 1.0, allclose)
    return Fidelity(agreement, rel_error, 1.0, None, None, 100, (output,))


def test_no_thresholds_no_problems():
    assert guard_problems(fidelity(0.0, 1e9), None, None) == []


@pytest.mark.parametrize(
    ("agreement", "problems"), [(0.99, []), (1.0, []), (0.98, ["top-1 agreement 0.9800 < 0.99"])]
)
def test_agreement_at_least_the_threshold_passes(agreement, problems):
    assert guard_problems(fidelity(agreement, 0.5), 0.99, None) == problems


def test_agreement_undefined_fails_an_agreement_guard():
    problems = guard_problems(fidelity(None, 0.0), 0.5, None)
    assert problems == ["top-1 agreement is undefined: the first output is not (N, classes)"]


@pytest.mark.parametrize(
    ("rel_error", "problems"),
    [
        (0.05, []),
        (0.01, []),
        (0.06, ["relative error 0.06 > 0.05"]),
        (float("nan"), ["relative error nan > 0.05"]),
    ],
)
def test_relative_error_at_most_the_threshold_passes(rel_error, problems):
    assert guard_problems(fidelity(None, rel_error), None, 0.05) == problems


def test_outputs_that_match_elementwise_pass_the_relative_error_rule():
    assert guard_problems(fidelity(None, 0.5, allclose=True), None, 0.05) == []
    # but not the agreement rule
    assert guard_problems(fidelity(0.5, 0.5, allclose=True), 0.9, 0.05) == ["top-1 agreement 0.5000 < 0.9"]


def test_both_rules_report_both_problems():
    assert len(guard_problems(fidelity(0.5, 0.5), 0.9, 0.05)) == 2


@pytest.mark.parametrize(("classifier", "expected"), [(True, "min_agreement"), (False, "max_rel_error")])
def test_default_thresholds_follow_the_outputs(classifier, expected):
    reference = SimpleNamespace(classifier=lambda: classifier)
    chosen = default_thresholds(Settings(), reference)
    defaults = {"min_agreement": DEFAULT_MIN_AGREEMENT, "max_rel_error": DEFAULT_MAX_REL_ERROR}
    other = ({"min_agreement", "max_rel_error"} - {expected}).pop()
    assert getattr(chosen, expected) == defaults[expected] and getattr(chosen, other) is None
    assert chosen.guarded


def test_default_thresholds_keep_the_users_and_no_guard():
    reference = SimpleNamespace(classifier=lambda: True)
    assert default_thresholds(Settings(max_rel_error=0.1), reference) == Settings(max_rel_error=0.1)
    assert default_thresholds(Settings(guard=False), reference) == Settings(guard=False)


def test_a_guard_only_measures_without_thresholds():
    reference = SimpleNamespace()
    assert Guard(reference, Settings(guard=False), dict).measures_only
    assert Guard(reference, Settings(), dict).measures_only  # before default_thresholds
    assert not Guard(reference, Settings(min_agreement=0.9), dict).measures_only
