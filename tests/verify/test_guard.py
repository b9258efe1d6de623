"""The guard's verdict output by output, its default thresholds, and when it only measures."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import compress_plain
from onnx import TensorProto, helper, numpy_helper

from egp_onnx.config import DEFAULT_MAX_REL_ERROR, DEFAULT_MIN_AGREEMENT, Settings
from egp_onnx.errors import ModelError
from egp_onnx.report.records import Fidelity, OutputFidelity
from egp_onnx.verify.guard import (
    Guard,
    ShippedForm,
    default_thresholds,
    guard_bound,
    guard_problems,
    surgery_failures,
)


def classes(
    agreement: float | None, estimate: float | None = None, name: str = "logits", n: int = 1000
) -> OutputFidelity:
    """A classifier output; ``estimate``: the agreement counting near-flips (default: ``agreement``)."""
    estimate = agreement if estimate is None else estimate
    flips = None if estimate is None else round((1 - estimate) * n)
    return OutputFidelity(
        name,
        0.5,
        1.0,
        False,
        kind="classes",
        agreement=agreement,
        estimate=estimate,
        flips=flips,
        positions=n,
    )


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
    assert guard_problems(fidelity(classes(0.995, n=200), samples=200), 0.99, None)
    assert guard_problems(fidelity(classes(0.995, n=5000), samples=5000), 0.99, None) == []
    # what GUARD_Z's comment says: at 0.99, no flip of 256 passes, two of 500 but not three
    passes = [guard_bound(1 - f / n, n) >= 0.99 for f, n in ((0, 256), (1, 256), (2, 500), (3, 500))]
    assert passes == [True, False, True, False]


def test_the_estimate_decides_not_the_plain_agreement():
    """A step that passes plain agreement but fails the estimate of unseen agreement is rejected."""
    plain_only = fidelity(classes(1.0, estimate=0.97))
    assert guard_problems(plain_only, 0.99, None, z=0.0) == [
        "output logits: top-1 agreement 0.9700 counting near-flips (measured 1.0000) < 0.99"
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
    sequence = OutputFidelity(
        "chars", 0.3, 1.0, False, kind="sequence", agreement=0.98, estimate=0.98, flips=2, positions=100
    )
    assert guard_problems(fidelity(classes(1.0), sequence), 0.99, 0.05, z=0.0) == [
        "output chars: sequence agreement 0.9800 < 0.99"
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


def test_the_shipped_form_is_judged_by_the_same_rule_and_named_in_its_complaints():
    """A form that cannot be made is a complaint; one that runs is judged as the float candidate is."""
    seen = []

    def evaluate(handle, atol, rtol):
        seen.append(handle.model)
        return Fidelity(0.98, 0.5, 1.0, None, None, 1000, (classes(0.98),))

    reference = SimpleNamespace(evaluate=evaluate)
    settings = Settings(min_agreement=0.99)
    candidate, shipped = onnx.ModelProto(), onnx.ModelProto()
    assert Guard(reference, settings, dict).shipped_problems(candidate) == []  # no form: nothing to judge
    guard = Guard(reference, settings, dict, ShippedForm("INT8", lambda model: shipped))
    (problem,) = guard.shipped_problems(candidate)
    assert problem.startswith("as INT8: output logits: top-1 agreement 0.9800") and seen == [shipped]

    def refuses(model):
        raise ModelError("onnxruntime cannot quantize the model to INT8: no")

    refused = ShippedForm("INT8", refuses)
    (problem,) = Guard(reference, settings, dict, refused).shipped_problems(candidate)
    assert problem == "as INT8: onnxruntime cannot quantize the model to INT8: no"
    # a guard that only measures never complains
    assert Guard(reference, Settings(guard=False), dict, refused).shipped_problems(candidate) == []


def test_surgery_reverts_on_a_change_not_on_rounding():
    rounding = tensor(2.3e-5, allclose=False, kind="map")  # a few large elements off by more than atol
    changed = tensor(1.0, allclose=False, kind="map")  # a near-zero map, its whole signal changed
    exact = tensor(0.2, allclose=True, kind="map")
    assert surgery_failures(fidelity(rounding, changed, exact)) == [changed]


def _two_heads(rng: np.random.Generator) -> onnx.ModelProto:
    """
    x(N,16) -> Gemm(16->48) "fc1" -> Relu -> Gemm(48->48) "fc2" -> Relu -+-> Gemm(48->4) -> logits(N,4)
                                                                         +-> Gemm(48->1) -> score(N,1)
    """

    def init(name, *shape):
        return numpy_helper.from_array((rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32), name)

    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="fc1.relu"),
        helper.make_node("Gemm", ["r1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="fc2.relu"),
        helper.make_node("Gemm", ["r2", "wc"], ["logits"], name="cls"),
        helper.make_node("Gemm", ["r2", "wb"], ["score"], name="reg"),
    ]
    graph = helper.make_graph(
        nodes, "two_heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        [init("w1", 16, 48), init("w2", 48, 48), init("wc", 48, 4), init("wb", 48, 1)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_second_output_is_guarded_when_the_first_is_a_classifier(rng, tmp_path):
    """Issue 24 class 8: a classifier first output must not let a second output change unchecked."""
    path = tmp_path / "m.onnx"
    onnx.save(_two_heads(rng), path)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(400, 16)).astype(np.float32))
    # agreement can not stop this run (0.0); only the default relative-error rule on "score" can
    result = compress_plain(str(path), str(tmp_path / "c.npz"), sparsity=0.9, min_agreement=0.0)
    report = result.report
    assert report.settings["max_rel_error"] == DEFAULT_MAX_REL_ERROR
    assert report.stop.reason == "guard"
    rejected = [s for s in report.steps if not s.accepted]
    assert rejected
    assert all(any(p.startswith("output score: relative error") for p in s.problems) for s in rejected)
    score = {o.name: o for o in report.fidelity.outputs}["score"]
    assert score.rel_error <= DEFAULT_MAX_REL_ERROR
    assert {o.name: o.kind for o in report.fidelity.outputs} == {"logits": "classes", "score": "tensor"}
