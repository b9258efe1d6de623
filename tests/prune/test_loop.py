"""LayerSet: the weights it reads, the model copies it makes only when they changed; the loop's rollback."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from conftest import SAMPLES, compress_plain
from models import inputs, residual_block

from egp_onnx.calibrate.collect import collect_statistics
from egp_onnx.config import Settings
from egp_onnx.errors import GuardError
from egp_onnx.graph.rectifiers import find_rectifiers
from egp_onnx.graph.weights import initializer_arrays, replace_initializers, tensor_values
from egp_onnx.load.calibration import open_calibration
from egp_onnx.load.model import load_model
from egp_onnx.prune.budget import prune_smallest
from egp_onnx.prune.limits import sparsity_limits
from egp_onnx.prune.loop import MIN_STEP, LayerSet, LoopContext, run_loop
from egp_onnx.reconstruct import refit as rc
from egp_onnx.report.records import Fidelity


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_apply_shares_the_model_it_read_and_copies_once_weights_change(rng):
    model = load_model(SAMPLES / "digits_resnet.onnx")
    original = tensor_values(model)
    layers = LayerSet(model, find_rectifiers(model))
    assert layers.apply(model) is model, "the weights are the model's own: no copy"
    other = replace_initializers(model, {})
    assert_same_tensors(tensor_values(layers.apply(other)), original)
    layers.weights = [prune_smallest(w, w.size // 2, rng) for w in layers.weights]
    pruned = layers.apply(model)
    assert pruned is not model
    values = tensor_values(pruned)
    for name, weight in zip(layers.weight_names, layers.weights, strict=True):
        np.testing.assert_array_equal(values[name], weight)
    assert_same_tensors(tensor_values(model), original)  # the model read from is untouched
    layers.read(pruned)
    assert layers.apply(pruned) is pruned


def test_reconstruct_given_the_model_itself_equals_given_a_copy():
    # the loop's first step now hands reconstruct the loaded model instead of a copy of it
    model = load_model(SAMPLES / "digits_resnet.onnx")
    calib = open_calibration(SAMPLES / "digits_calib.npz", model)
    names = ["block1.conv1.weight", "block2.conv2.weight", "fc1.weight"]
    weights = initializer_arrays(model, names)
    remove = {n: weights[n].size // 2 for n in names}
    copy = replace_initializers(model, weights)
    shared = rc.reconstruct(model, model, calib, 64, remove=remove, masked=names, seed=3)
    copied = rc.reconstruct(model, copy, calib, 64, remove=remove, masked=names, seed=3)
    assert_same_tensors(tensor_values(shared.model), tensor_values(copied.model))
    assert_same_tensors(tensor_values(model), tensor_values(copy))


def test_reconstruct_takes_known_weights_as_they_are_with_the_same_result(monkeypatch):
    import egp_onnx.graph.weights as topology

    model = load_model(SAMPLES / "digits_resnet.onnx")
    calib = open_calibration(SAMPLES / "digits_calib.npz", model)
    layers = LayerSet(model, find_rectifiers(model))
    names = layers.weight_names
    remove = {n: w.size // 2 for n, w in zip(names, layers.weights, strict=True)}
    plain = rc.reconstruct(model, model, calib, 64, remove=remove, masked=names, seed=3)
    read = []
    real = topology.numpy_helper.to_array
    monkeypatch.setattr(topology.numpy_helper, "to_array", lambda t, *a: read.append(t.name) or real(t, *a))
    held = layers.held(model)
    known = rc.reconstruct(model, model, calib, 64, remove=remove, masked=names, seed=3, known=held)
    assert read and not set(read) & set(names), "the loop's (read-only) arrays are not read again"
    assert_same_tensors(tensor_values(known.model), tensor_values(plain.model))
    assert known.fits == plain.fits


def test_held_gives_the_weights_only_for_the_model_that_holds_them(rng):
    model = load_model(SAMPLES / "digits_resnet.onnx")
    layers = LayerSet(model, find_rectifiers(model))
    held = layers.held(model)
    assert list(held) == layers.weight_names
    assert all(held[n] is w for n, w in zip(layers.weight_names, layers.weights, strict=True))
    assert layers.held(replace_initializers(model, {})) == {}, "a copy is not known to hold them"
    layers.weights = [prune_smallest(w, w.size // 2, rng) for w in layers.weights]
    assert layers.held(model) == {}, "the weights changed"
    pruned = layers.apply(model)  # the model just written from the weights holds them
    values = tensor_values(pruned)
    for name, array in layers.held(pruned).items():
        np.testing.assert_array_equal(values[name], array)
        assert values[name].dtype == array.dtype


def test_nnz_is_counted_once_per_set_of_weights(rng, monkeypatch):
    model = load_model(SAMPLES / "digits_resnet.onnx")
    layers = LayerSet(model, find_rectifiers(model))
    counted = []
    real = np.count_nonzero
    monkeypatch.setattr(np, "count_nonzero", lambda a, *args, **kw: counted.append(1) or real(a, *args, **kw))
    first = layers.nnz()
    assert layers.nnz().tolist() == first.tolist() == [real(w) for w in layers.weights]
    assert len(counted) == len(layers.weights), "the second call counts nothing"
    first[0] = -1  # the caller's copy
    layers.weights = [prune_smallest(w, w.size // 2, rng) for w in layers.weights]
    assert layers.nnz().tolist() == [real(w) for w in layers.weights]


def test_release_lets_the_weights_go_and_reads_them_again_from_the_model_that_holds_them(rng, monkeypatch):
    import egp_onnx.graph.weights as topology

    model = load_model(SAMPLES / "digits_resnet.onnx")
    layers = LayerSet(model, find_rectifiers(model))
    layers.weights = [prune_smallest(w, w.size // 2, rng) for w in layers.weights]
    kept = [w.copy() for w in layers.weights]
    direct = layers.weights
    layers.release()
    assert all(a is b for a, b in zip(layers.weights, direct, strict=True)), "no model holds them: kept"
    del direct
    pruned = layers.apply(model)
    nnz, sizes = layers.nnz(), layers.sizes()
    alive = [weakref.ref(w) for w in layers.weights]
    layers.release()
    assert all(ref() is None for ref in alive), "the arrays are freed"
    read = []
    real = topology.numpy_helper.to_array
    monkeypatch.setattr(topology.numpy_helper, "to_array", lambda t, *a: read.append(t.name) or real(t, *a))
    assert layers.nnz().tolist() == nnz.tolist() and layers.sizes().tolist() == sizes.tolist()
    assert read == [], "the counts need no weights"
    for weights, expected in zip(layers.weights, kept, strict=True):
        np.testing.assert_array_equal(weights, expected)
    assert sorted(read) == sorted(layers.weight_names), "read again from the pruned model, once"
    assert layers.apply(pruned) is pruned and layers.held(pruned).keys() == set(layers.weight_names)


def test_a_rejected_step_is_retried_from_the_last_accepted_weights():
    """Step 2's first attempt fails the guard; its retry prunes step 1's weights, not the rejected ones."""
    model = load_model(SAMPLES / "digits_resnet.onnx")
    calib = open_calibration(SAMPLES / "digits_calib.npz", model)
    sites = find_rectifiers(model)
    layers = LayerSet(model, sites)
    limits = sparsity_limits(model, layers.weight_names, 0.98)
    settings = Settings(sparsity=0.8, step=0.5, batch_size=64, reconstruct=False, min_agreement=0.5)
    candidates: list[dict[str, np.ndarray]] = []

    class Guard:
        measures_only = False

        def __call__(self, candidate):
            candidates.append(initializer_arrays(candidate, layers.weight_names))
            fails = len(candidates) == 2
            fidelity = Fidelity(0.0 if fails else 1.0, 0.0, 0.0, None, None, 1, ())
            return fidelity, ["rejected"] if fails else []

        def shipped_problems(self, candidate):
            return []

    stats = collect_statistics(model, sites, calib, 64)
    quiet = lambda *args: None  # noqa: E731
    context = LoopContext(model, sites, layers, limits, calib, settings, Guard(), quiet, quiet)
    outcome = run_loop(context, stats)
    assert [s.accepted for s in outcome.steps[:3]] == [True, False, True]
    accepted, rejected, retry = candidates[:3]
    removed = outcome.steps[2].removed
    zeros = {n: int((w == 0).sum()) for n, w in accepted.items()}
    assert sum(int((retry[n] == 0).sum()) - zeros[n] for n in retry) == removed
    rejected_zeros = sum(int((rejected[n] == 0).sum()) - zeros[n] for n in rejected)
    assert rejected_zeros == outcome.steps[1].removed > removed
    for name, weights in retry.items():
        kept = weights != 0
        np.testing.assert_array_equal(weights[kept], accepted[name][kept], err_msg=name)
        assert not (kept & (accepted[name] == 0)).any(), name


def test_guard_stops_at_the_right_step(rng, tmp_path):
    model = residual_block(rng)
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=24, shape=(4, 6, 6)))
    calib = tmp_path / "c.npz"
    free = compress_plain(model, calib, sparsity=0.95, step=0.3, surgery=False, latency=False).report
    errors = [s.rel_error for s in free.steps]
    assert len(errors) >= 4 and errors[:4] == sorted(errors[:4]), "damage grows step by step"
    threshold = (errors[1] + errors[2]) / 2  # step 2 passes, step 3 does not
    guarded = compress_plain(
        model, calib, sparsity=0.95, step=0.3, surgery=False, latency=False, max_rel_error=threshold,
        sensitivity=False,  # the loop's own steps, not the layers' caps, are under test
    )  # fmt: skip
    report = guarded.report
    steps = report.steps
    assert report.stop.reason == "guard"
    # steps 1 and 2 are the free run's; step 3 at full size breaks the guard and is rolled back
    assert [(s.removed, s.accepted) for s in steps[:3]] == [
        (free.steps[0].removed, True),
        (free.steps[1].removed, True),
        (free.steps[2].removed, False),
    ]
    # after a rejection the steps bisect between the last accepted and the smallest rejected sparsity
    for rejected, retry in zip(steps[:-1], steps[1:], strict=True):
        if not rejected.accepted:
            assert retry.removed < rejected.removed
    assert "rejects" in report.stop.detail
    accepted = [s for s in steps if s.accepted]
    assert all(s.rel_error <= threshold for s in accepted)
    assert all(s.rel_error > threshold for s in steps if not s.accepted)
    # the written model is the last accepted step's
    assert report.stop.step == accepted[-1].step
    assert report.model.sparsity == pytest.approx(accepted[-1].sparsity)
    assert report.fidelity.rel_error == pytest.approx(accepted[-1].rel_error, rel=1e-6)


class _SparsityGuard:
    """Accepts a candidate when the loop's weights are at most ``ceiling`` sparse; records each sparsity."""

    measures_only = False

    def __init__(self, layers: LayerSet, ceiling: float, shipped: float = 1.0) -> None:
        self.layers, self.ceiling, self.seen = layers, ceiling, []
        self.shipped, self.shipped_seen = shipped, []  # the same rule as it ships, with its own ceiling

    def __call__(self, candidate):
        sparsity = 1 - self.layers.nnz().sum() / self.layers.sizes().sum()
        self.seen.append(sparsity)
        fails = sparsity > self.ceiling
        return Fidelity(0.0 if fails else 1.0, 0.0, 0.0, None, None, 1, ()), ["too sparse"] if fails else []

    def shipped_problems(self, candidate):
        sparsity = 1 - self.layers.nnz().sum() / self.layers.sizes().sum()
        self.shipped_seen.append(sparsity)
        return ["too sparse as it ships"] if sparsity > self.shipped else []


def _guarded_loop(target: float, ceiling: float, step: float = 0.5, shipped: float = 1.0):
    model = load_model(SAMPLES / "digits_resnet.onnx")
    calib = open_calibration(SAMPLES / "digits_calib.npz", model)
    sites = find_rectifiers(model)
    layers = LayerSet(model, sites)
    limits = sparsity_limits(model, layers.weight_names, 0.98)
    settings = Settings(sparsity=target, step=step, batch_size=128, reconstruct=False, min_agreement=0.5)
    guard = _SparsityGuard(layers, ceiling, shipped)
    quiet = lambda *args: None  # noqa: E731
    context = LoopContext(model, sites, layers, limits, calib, settings, guard, quiet, quiet)
    return run_loop(context, collect_statistics(model, sites, calib, 128)), guard


def test_retries_shrink_a_step_that_the_target_caps():
    """--sparsity 0.1 caps step 1 at 0.1: each retry after a rejection still aims lower than the last."""
    outcome, guard = _guarded_loop(0.1, 0.03)
    rejected = [s.sparsity for s in outcome.steps if not s.accepted]
    assert rejected[0] == pytest.approx(0.1, abs=1e-3)
    assert rejected == sorted(rejected, reverse=True) and len(set(rejected)) == len(rejected)
    final = outcome.steps[outcome.stop.step - 1].sparsity
    assert outcome.stop.reason == "guard" and final <= 0.03


def test_a_result_that_fails_as_it_ships_is_searched_again_from_the_start_judged_as_it_ships():
    """Float allows 0.62, the shipped form (INT8) 0.4: the loop ends at most 0.4, near it, shipped-judged."""
    outcome, guard = _guarded_loop(0.95, 0.62, shipped=0.4)
    final = outcome.steps[outcome.stop.step - 1]
    assert final.accepted and 0.35 <= final.sparsity <= 0.4
    assert guard.shipped_seen[0] > 0.55  # the float search's result was asked first, and failed
    assert outcome.stop.reason == "guard" and "failed the guard as it ships" in outcome.stop.detail
    # after it, each step that passes in float is judged as it ships, and rejected when that fails
    shipped_rejected = [s for s in outcome.steps if s.problems == ("too sparse as it ships",)]
    assert shipped_rejected and all(0.4 < s.sparsity <= 0.62 for s in shipped_rejected)
    assert len(guard.shipped_seen) < len(outcome.steps)  # asked of float-passing candidates only


def test_a_result_that_passes_as_it_ships_costs_one_shipped_check():
    outcome, guard = _guarded_loop(0.95, 0.62, shipped=0.7)
    assert len(guard.shipped_seen) == 1 and "as it ships" not in outcome.stop.detail
    assert outcome.steps[outcome.stop.step - 1].sparsity <= 0.62


@pytest.mark.parametrize("ceiling", [0.62, 0.8])
def test_a_strict_guard_converges_in_few_steps_near_its_limit(ceiling):
    outcome, guard = _guarded_loop(0.95, ceiling)
    assert len(outcome.steps) <= 25
    assert outcome.stop.reason == "guard"
    final = outcome.steps[outcome.stop.step - 1].sparsity
    assert final <= ceiling
    # the search stops once no step between the accepted and the rejected sparsity is worth trying
    smallest_rejected = min(s.sparsity for s in outcome.steps if not s.accepted)
    assert smallest_rejected - final < MIN_STEP * (1 - final) + 1e-9
    assert final > ceiling - MIN_STEP * (1 - final) - 1e-3
    assert "rejects" in outcome.stop.detail and "less than" in outcome.stop.detail


def test_a_guard_that_nothing_passes_fails_after_a_bounded_search():
    with pytest.raises(GuardError, match="step 1 failed the guard at"):
        _, guard = _guarded_loop(0.95, 0.0)


def test_measured_caps_are_spent_first_and_past_them_the_guard_decides():
    """Layers capped at 40% stay within it until every one is at its cap; then the guard decides."""
    model = load_model(SAMPLES / "digits_resnet.onnx")
    calib = open_calibration(SAMPLES / "digits_calib.npz", model)
    sites = find_rectifiers(model)
    layers = LayerSet(model, sites)
    limits = sparsity_limits(model, layers.weight_names, 0.98)
    caps = {n: min(limits[n], 0.4) for n in layers.weight_names}
    settings = Settings(sparsity=0.9, step=0.3, batch_size=64, reconstruct=False, min_agreement=0.5)
    most: list[float] = []  # per candidate, the largest sparsity of any layer

    class Guard:
        measures_only = False

        def __call__(self, candidate):
            weights = initializer_arrays(candidate, layers.weight_names)
            most.append(max(float((w == 0).mean()) for w in weights.values()))
            return Fidelity(1.0, 0.0, 0.0, None, None, 1, ()), []

        def shipped_problems(self, candidate):
            return []

    quiet = lambda *args: None  # noqa: E731
    context = LoopContext(model, sites, layers, limits, calib, settings, Guard(), quiet, quiet, caps=caps)
    outcome = run_loop(context, collect_statistics(model, sites, calib, 64))
    assert outcome.stop.reason == "target" and outcome.steps[-1].sparsity == pytest.approx(0.9, abs=1e-3)
    sparsities = [s.sparsity for s in outcome.steps]
    within = [m for m, s in zip(most, sparsities, strict=True) if s <= 0.4 - 1e-3]
    assert len(within) >= 1 and max(within) <= 0.4 + 1e-3  # no layer past its cap while others have room
    assert most[-1] > 0.4  # past every cap the budget goes on, each step under the guard
