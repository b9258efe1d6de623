"""`verify` and the comparison behind it (verify/fidelity.py): outputs compared by name."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cli_checks import one_line_error
from click.testing import CliRunner
from conftest import SAMPLES
from models import inputs, save, two_convs
from onnx import helper, numpy_helper

from egp_onnx.cli.main import main
from egp_onnx.load.calibration import open_calibration
from egp_onnx.verify.fidelity import (
    FidelitySums,
    Reference,
    compare,
    greedy_decode,
    output_kind,
    scaled_flips,
    sequence_agreement,
)
from egp_onnx.verify.guard import guard_problems

MODEL = SAMPLES / "digits_resnet.onnx"
TEST = SAMPLES / "digits_test.npz"


def test_verify_passes_identical_copy_and_fails_one_changed_weight(tmp_path):
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(MODEL.read_bytes())
    changed = onnx.load(str(MODEL))
    tensor = next(t for t in changed.graph.initializer if t.name == "block2.conv1.weight")
    array = numpy_helper.to_array(tensor).copy()
    array.flat[7] += 0.5
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    onnx.save(changed, str(tmp_path / "changed.onnx"))
    runner = CliRunner()
    same = runner.invoke(main, ["verify", str(MODEL), str(copy), "--data", str(TEST)])
    assert same.exit_code == 0 and "PASS" in same.output
    differ = runner.invoke(main, ["verify", str(MODEL), str(tmp_path / "changed.onnx"), "--data", str(TEST)])
    assert differ.exit_code == 1 and "FAIL" in differ.output
    bad = runner.invoke(main, ["verify", str(MODEL), str(tmp_path / "nope.onnx"), "--data", str(TEST)])
    assert bad.exit_code == 2 and "not found" in bad.stderr


def test_verify_with_different_output_names_says_so(runner, tmp_path, rng):
    model = two_convs(rng)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.node.append(helper.make_node("Identity", ["y"], ["q"], name="rename"))
    renamed.graph.output[0].name = "q"
    save(model, tmp_path / "a.onnx")
    save(renamed, tmp_path / "b.onnx")
    np.savez(tmp_path / "d.npz", x=inputs(rng))
    result = runner.invoke(
        main,
        ["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--data", str(tmp_path / "d.npz")],
    )
    assert one_line_error(result) == (
        "egp-onnx: error: the models' outputs differ: the compressed model has no output y (its outputs: q); "
        "outputs are compared by name"
    )


# --- the comparison's rules: kinds, the estimate of unseen agreement, tolerances, sums ---------


def _logit_model(bias: list[float]) -> onnx.ModelProto:
    """
    x(N,3) -> Add(bias) -> logits(N,3)

    With bias [0, d, 0] against bias 0, a sample of class 0 flips to class 1 exactly when its
    margin x0 - x1 is below d: a model that flips only on low-margin inputs.
    """
    nodes = [helper.make_node("Add", ["x", "b"], ["logits"], name="add")]
    graph = helper.make_graph(
        nodes,
        "shift",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.asarray(bias, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _samples(margins: np.ndarray) -> np.ndarray:
    """Class 0 ahead of class 1 by ``margins``, class 2 far behind."""
    return np.stack([margins, np.zeros_like(margins), np.full_like(margins, -9.0)], 1).astype(np.float32)


def test_output_kinds(rng):
    assert [output_kind(s) for s in [(8, 10), (8, 1), (8, 25, 97), (8, 1, 32, 32), (8, 4, 32, 32), (8,)]] == [
        "classes", "tensor", "map", "map", "map", "tensor",
    ]  # fmt: skip
    logits = rng.normal(size=(8, 25, 97))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    # a recogniser's softmax or log-softmax is a sequence; a detector's raw (N, anchors, 4 + C) is not
    assert output_kind(probs.shape, probs) == output_kind(probs.shape, np.log(probs)) == "sequence"
    assert output_kind(logits.shape, logits) == "map"


def test_scaled_flips_against_a_plain_loop(rng):
    ref, cand = rng.normal(size=(200, 5)), rng.normal(size=(200, 5))
    cand = ref + 0.3 * cand
    for scale in (1.0, 0.9, 0.5):
        expected = []
        for r, c in zip(ref, cand, strict=True):
            top = r.argmax()
            expected.append(
                any((c[j] - c[top]) - (r[j] - r[top]) > scale * (r[top] - r[j]) for j in range(5) if j != top)
            )
        np.testing.assert_array_equal(scaled_flips(ref, cand, scale), expected)
    np.testing.assert_array_equal(scaled_flips(ref, cand, 1.0), ref.argmax(1) != cand.argmax(1))


def test_the_estimate_sees_flips_that_confident_held_out_data_hides(tmp_path):
    """Held-out margins just above the shift: no plain flip, but the estimate counts them; unseen
    inputs (margins down to half the shift) flip for real, and the guard rejects the step."""
    original, shifted = _logit_model([0, 0, 0]), _logit_model([0, 1.0, 0])
    held = tmp_path / "held.npz"
    np.savez(held, x=_samples(np.linspace(1.02, 1.1, 50)))
    unseen = tmp_path / "unseen.npz"
    np.savez(unseen, x=_samples(np.linspace(0.5, 1.5, 101)))
    reference = Reference(original, open_calibration(held, original), 16)
    measured = reference.evaluate(shifted)
    assert measured.top1_agreement == 1.0 and measured.outputs[0].flips == 50
    assert measured.estimate == pytest.approx(0.5 / 51)  # Jeffreys: (0 + 1/2) / (50 + 1)
    assert measured.estimate_low is not None and measured.estimate_high is not None
    assert guard_problems(measured, 0.99, None)
    truth = compare(original, shifted, open_calibration(unseen, original), 16)
    assert truth.top1_agreement == pytest.approx(51 / 101) and truth.outputs[0].flips == 50
    assert truth.estimate == pytest.approx(51.5 / 102)
    assert truth.unseen and not measured.unseen


def _ctc_path(path: list[int], classes: int = 5, margin: float = 4.0) -> np.ndarray:
    """A CTC head's log-softmax over ``path`` (class 0 the blank), each position's top ``margin`` ahead."""
    logits = np.zeros((len(path), classes))
    logits[np.arange(len(path)), path] = margin
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _reading(ref: np.ndarray, cand: np.ndarray, unseen: bool = True) -> tuple[float | None, int | None]:
    sums = FidelitySums(["seq"], 1e-5, 1e-5, unseen=unseen)
    sums.add([ref[None]], [cand[None]], None)
    out = sums.result().outputs[0]
    assert out.kind == "sequence" and out.positions == 1  # one sequence, one sample
    return out.agreement, out.flips


def test_greedy_decode_collapses_repeats_then_drops_the_blank():
    np.testing.assert_array_equal(greedy_decode(np.array([0, 1, 1, 0, 1, 2, 2, 0]), 0), [1, 1, 2])
    np.testing.assert_array_equal(greedy_decode(np.array([3, 3, 3]), 3), np.zeros(0))


def test_a_sequence_is_judged_by_its_reading_not_its_positions():
    """A character's edge moving into the blank keeps the reading; a changed character does not."""
    ref = _ctc_path([0, 1, 1, 0, 0, 2, 0, 0])
    edge = _ctc_path([0, 1, 0, 0, 0, 2, 2, 0])  # two positions differ, the reading "1 2" is the same
    assert _reading(ref, edge) == (1.0, 0)
    changed = _ctc_path([0, 1, 1, 0, 0, 3, 0, 0])  # one position differs: "1 3"
    assert _reading(ref, changed) == (0.0, 1)
    split = _ctc_path([0, 1, 0, 1, 0, 2, 0, 0])  # a blank inside a run: "1 1 2"
    assert _reading(ref, split) == (0.0, 1)


def test_a_sequence_near_flip_counts_only_where_it_would_change_the_reading():
    """Under the estimate (data not unseen), a position that nearly flips counts when its rival
    class would change the reading: not at a character's edge toward the blank, yes at its centre."""
    ref = _ctc_path([0, 1, 1, 0, 2, 0])
    edge = ref.copy()
    edge[2, 0] += 3.8  # the blank comes within 5% of the margin at the run's second position
    assert _reading(ref, edge, unseen=False) == (1.0, 0)
    centre = ref.copy()
    centre[4, 0] += 3.8  # the same toward the blank at the only position of "2"
    assert _reading(ref, centre, unseen=False) == (1.0, 1)
    assert _reading(ref, centre, unseen=True) == (1.0, 0)  # unseen data: plain agreement


def test_sequence_agreement_against_the_per_sample_reading(rng):
    """Batches of random paths: the sums count the samples whose readings differ."""
    paths = rng.choice(4, p=[0.7, 0.1, 0.1, 0.1], size=(12, 20))
    ref = np.stack([_ctc_path(list(p), classes=4) for p in paths])
    moved = paths.copy()
    moved[::3, 5] = (moved[::3, 5] + 1) % 4  # every third sample: one position changed
    cand = np.stack([_ctc_path(list(p), classes=4) for p in moved])
    agree, kept = sequence_agreement(ref, cand, 1.0)
    expected = [
        np.array_equal(greedy_decode(a, 0), greedy_decode(b, 0)) for a, b in zip(paths, moved, strict=True)
    ]
    np.testing.assert_array_equal(agree, expected)
    np.testing.assert_array_equal(kept, agree)  # scale 1: near flips are plain flips
    assert not all(expected)


def test_a_near_zero_map_is_judged_on_its_own_scale(rng):
    """An atol of 1e-4 would call a map of ~1e-6 values unchanged whatever happens to it."""
    ref = rng.uniform(0, 2e-6, size=(2, 1, 8, 8))
    changed, rounded = ref * 2.0, ref * (1 + 1e-7)
    for cand, close in ((changed, False), (rounded, True)):
        sums = FidelitySums(["map"], 1e-4, 1e-3)
        sums.add([ref], [cand], None)
        out = sums.result().outputs[0]
        # values in [0, 1]: a probability map, judged by its regions unless --max-rel-error alone
        assert out.kind == "probability" and out.allclose is close
    assert guard_problems(_result(ref, changed), None, 0.05) == ["output map: relative error 1 > 0.05"]


def _result(ref, cand):
    sums = FidelitySums(["map"], 1e-4, 1e-3)
    sums.add([ref], [cand], None)
    return sums.result()


def test_sums_of_two_halves_merge_into_the_whole(rng):
    ref = [rng.normal(size=(40, 7)), rng.normal(size=(40, 2, 4, 4))]
    cand = [r + 0.4 * rng.normal(size=r.shape) for r in ref]
    labels = rng.integers(0, 7, size=40)
    whole = FidelitySums(["a", "b"], 1e-5, 1e-5)
    whole.add(ref, cand, labels)
    first, second = FidelitySums(["a", "b"], 1e-5, 1e-5), FidelitySums(["a", "b"], 1e-5, 1e-5)
    first.add([r[:25] for r in ref], [c[:25] for c in cand], labels[:25])
    second.add([r[25:] for r in ref], [c[25:] for c in cand], labels[25:])
    merged = first.merge(second).result()
    expected = whole.result()
    assert merged.samples == expected.samples == 40
    assert merged.estimate == expected.estimate and merged.accuracy_after == expected.accuracy_after
    for a, b in zip(merged.outputs, expected.outputs, strict=True):
        assert a.rel_error == pytest.approx(b.rel_error) and a.agreement == b.agreement
