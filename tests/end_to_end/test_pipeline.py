"""compress() and analyze() through the Python API, checked against onnxruntime and numpy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, compress_plain, load_npz
from models import gemm_head, inputs, residual_block, toy_files
from onnx import TensorProto, numpy_helper
from references import run_ort

import egp_onnx
from egp_onnx.calibrate.collect import collect_statistics
from egp_onnx.entropy import layer_entropy
from egp_onnx.graph.rectifiers import find_rectifiers
from egp_onnx.load.calibration import open_calibration
from egp_onnx.load.model import load_model, prepare_model


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture
def residual(rng, tmp_path):
    model = residual_block(rng)
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=16, shape=(4, 6, 6)))
    return model, tmp_path / "c.npz"


def test_sparsity_zero_is_output_identical_and_caller_model_untouched(residual, rng):
    model, calib = residual
    snapshot = model.SerializeToString()
    result = compress_plain(model, calib, sparsity=0.0, surgery=False)
    assert model.SerializeToString() == snapshot
    x = inputs(rng, n=5, shape=(4, 6, 6))
    np.testing.assert_array_equal(run_ort(result.model, {"x": x})[0], run_ort(model, {"x": x})[0])
    assert result.report.model.prunable_zeroed == 0
    assert result.report.steps == ()


def test_pruned_weights_stay_zero_and_masks_grow(residual):
    model, calib = residual
    low = compress_plain(model, calib, sparsity=0.3, surgery=False).model
    high = compress_plain(model, calib, sparsity=0.6, surgery=False).model
    for name in ("w0", "w1", "w2"):
        # pruning is deterministic and monotone: the 60% model zeroes everything the 30% model did
        assert ((weights(low)[name] == 0) <= (weights(high)[name] == 0)).all()
    original = weights(model)
    for name, array in weights(high).items():
        kept = array != 0
        np.testing.assert_array_equal(array[kept], original[name][kept])
    assert weights(high)["wp"].all(), "the projection shortcut owns no rectifier and stays dense"
    assert weights(high)["b1"].all(), "biases are not pruned"


def test_within_layer_pruning_is_smallest_magnitude(residual):
    model, calib = residual
    pruned = weights(compress_plain(model, calib, sparsity=0.5, surgery=False).model)
    original = weights(model)
    for name in ("w0", "w1", "w2"):
        zeroed = pruned[name] == 0
        if zeroed.any() and (~zeroed).any():
            assert np.abs(original[name][zeroed]).max() <= np.abs(original[name][~zeroed]).min()


def test_first_step_follows_the_budget(rng, tmp_path):
    """One step of 0.5 moves exactly the weights the allocation gives, layer by layer."""
    model = prepare_model(gemm_head(rng))
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=32))
    data = open_calibration(tmp_path / "c.npz", model)
    sites = [s for s in find_rectifiers(model) if s.prunable]
    stats = collect_statistics(model, sites, data, 32)
    w = weights(model)
    entropy = np.array([layer_entropy(stats.counts[s.name].on, stats.counts[s.name].total) for s in sites])
    arrays = [w[s.owner.weight] for s in sites]
    nnz = np.array([a.size for a in arrays])
    mean_abs = np.array([np.abs(a).mean() for a in arrays])
    from egp_onnx.prune.budget import capacities, egp_allocation, integer_amounts
    from egp_onnx.prune.limits import sparsity_limits

    limits = sparsity_limits(model, [s.owner.weight for s in sites], 0.98)
    capacity = capacities(nnz, nnz, np.array([limits[s.owner.weight] for s in sites]))
    participating = (entropy > 0) & (capacity > 0)
    budget = int(np.floor(0.5 * nnz[participating].sum()))
    entropy = np.where(capacity > 0, entropy, 0.0)
    expected = integer_amounts(egp_allocation(entropy, mean_abs, capacity, budget), capacity, budget)
    total = nnz.sum()
    sparsity = budget / total
    result = compress_plain(model, tmp_path / "c.npz", sparsity=sparsity, step=0.5, surgery=False)
    got = [int((weights(result.model)[s.owner.weight] == 0).sum()) for s in sites]
    assert got == expected.tolist()
    assert len(result.report.steps) == 1 and result.report.steps[0].removed == budget


def test_magnitude_method_same_sparsity(residual):
    model, calib = residual
    # 0.6: within the layers' limits (w2 feeds the output and stays dense; w0 keeps 2%)
    egp = compress_plain(model, calib, sparsity=0.6).report.model
    mag = compress_plain(model, calib, sparsity=0.6, method="magnitude").report.model
    assert egp.prunable_zeroed == mag.prunable_zeroed == round(0.6 * egp.prunable_weights)


def test_analyze_sample_reports_every_relu():
    report = egp_onnx.analyze(SAMPLES / "digits_resnet.onnx", SAMPLES / "digits_calib.npz", batch_size=100)
    assert report.samples == 512
    assert [r.rectifier for r in report.layers][:2] == ["stem.relu", "block1.relu1"]
    assert all(r.prunable and r.activation == "Relu" for r in report.layers)
    assert all(r.always_on + r.always_off <= r.channels for r in report.layers)


def test_sample_ninety_percent_report_is_consistent():
    result = compress_plain(SAMPLES / "digits_resnet.onnx", SAMPLES / "digits_calib.npz", sparsity=0.9)
    report = result.report
    assert report.model.sparsity == pytest.approx(0.9, abs=1e-4)
    assert report.surgery.enabled and not report.surgery.reverted
    assert report.surgery.rel_error < 1e-4
    assert [s.sparsity for s in report.steps] == sorted(s.sparsity for s in report.steps)
    assert report.steps[-1].sparsity == pytest.approx(0.9, abs=1e-4)
    for layer in report.layers:
        if layer.nonzero == 0:
            assert layer.state in ("constant", "removed")
    onnx.checker.check_model(result.model)


def test_sparsity_zero_with_surgery_matches_outputs(residual, rng):
    model, calib = residual
    result = compress_plain(model, calib, sparsity=0.0)
    x = inputs(rng, n=5, shape=(4, 6, 6))
    np.testing.assert_allclose(
        run_ort(result.model, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-5, atol=1e-5
    )
    assert result.report.surgery.enabled and not result.report.surgery.reverted


def test_freed_memory_is_trimmed_once_before_surgery(residual, monkeypatch):
    # The loop's and the original's weights are let go after the loop; trim() hands the heap's free
    # pages back before surgery builds the rewritten model's session (the run's peak on VGG-19).
    import egp_onnx.api.compress as pipeline

    events = []
    monkeypatch.setattr(pipeline, "trim", lambda: events.append("trim") or True)
    simplify = pipeline.simplify
    monkeypatch.setattr(pipeline, "simplify", lambda *a, **k: events.append("surgery") or simplify(*a, **k))
    model, calib = residual
    compress_plain(model, calib, sparsity=0.5)
    assert events == ["trim", "surgery"]


def test_sample_at_95_percent_is_shallower_and_runs():
    result = compress_plain(SAMPLES / "digits_resnet.onnx", SAMPLES / "digits_calib.npz", sparsity=0.95)
    summary = result.report.model
    assert summary.depth_after < summary.depth_before == 9
    assert summary.nonlinear_depth_after < summary.nonlinear_depth_before
    onnx.checker.check_model(result.model, full_check=True)
    test = load_npz(SAMPLES / "digits_test.npz")
    logits = run_ort(result.model, {"input": test["input"]})[0]
    assert logits.shape == (len(test["input"]), 10) and np.isfinite(logits).all()
    assert {layer.state for layer in result.report.layers} <= {
        "kept",
        "pruned",
        "constant",
        "identity",
        "merged",
        "removed",
    }


def test_iterative_magnitude_equals_one_global_cut(residual):
    model, calib = residual
    stepped = compress_plain(
        model, calib, sparsity=0.8, step=0.3, method="magnitude", surgery=False, latency=False
    )
    one_cut = compress_plain(
        model, calib, sparsity=0.8, step=1.0, method="magnitude", surgery=False, latency=False
    )
    assert len(stepped.report.steps) > 1 and len(one_cut.report.steps) == 1
    for name, array in weights(one_cut.model).items():
        np.testing.assert_array_equal(weights(stepped.model)[name], array)


def test_reference_outputs_run_beside_the_statistics_pass_on_their_own_data(rng, tmp_path, monkeypatch):
    """A held-out split is run in a second thread while the statistics pass runs; the calibration
    data itself (holdout 0) is never read from two threads at once. The results are the same."""
    import threading

    import egp_onnx.api.compress as pipeline

    threads = []
    real = pipeline.Reference

    class Recording(real):
        def __init__(self, *args, **kwargs):
            threads.append(threading.current_thread() is threading.main_thread())
            super().__init__(*args, **kwargs)

    model, calib = toy_files(tmp_path, rng)
    options = {"sparsity": 0.5, "step": 1.0, "guard": False, "latency": False}
    plain = egp_onnx.compress(model, calib, **options)
    monkeypatch.setattr(pipeline, "Reference", Recording)
    split = egp_onnx.compress(model, calib, **options)
    egp_onnx.compress(model, calib, holdout=0.0, **options)
    assert threads == [False, True]
    assert split.model.SerializeToString() == plain.model.SerializeToString()
    assert split.report.fidelity == plain.report.fidelity and split.report.layers == plain.report.layers


def test_a_step_is_measured_after_its_statistics_pass_only_without_thresholds(rng, tmp_path, monkeypatch):
    """Without the guard's thresholds no step can be rolled back: its statistics pass runs first, and
    its session is gone before the measurement builds the candidate's (one large session built at a
    time). With them, the statistics wait for the verdict."""
    import egp_onnx.prune.loop as loop
    from egp_onnx.verify.guard import Guard

    events = []
    measure, count = Guard.check, loop.collect_statistics

    def measuring(self, handle):
        events.append("measure")
        return measure(self, handle)

    def counting(*args, **kwargs):
        events.append("count")
        return count(*args, **kwargs)

    model, calib = toy_files(tmp_path, rng)
    options = {"sparsity": 0.5, "step": 1.0, "latency": False}
    plain = egp_onnx.compress(model, calib, guard=False, **options)
    monkeypatch.setattr(Guard, "check", measuring)
    monkeypatch.setattr(loop, "collect_statistics", counting)
    after = egp_onnx.compress(model, calib, guard=False, **options)
    assert events == ["count", "measure", "measure"], "the step's pass and measurement, the rewritten model"
    events.clear()
    egp_onnx.compress(model, calib, max_rel_error=10.0, **options)
    assert events == ["measure", "count", "measure"]
    assert after.model.SerializeToString() == plain.model.SerializeToString()
    assert after.report.steps == plain.report.steps and after.report.layers == plain.report.layers


def test_the_original_kept_for_the_latency_is_its_session_and_graph(rng, tmp_path, monkeypatch):
    """The session holds its own copy of the weights; the model beside it is the graph only."""
    import egp_onnx.api.compress as pipeline

    timed = []
    real = pipeline.compare_latency
    monkeypatch.setattr(pipeline, "compare_latency", lambda *args: timed.append(args[0]) or real(*args))
    model, calib = toy_files(tmp_path, rng)
    egp_onnx.compress(model, calib, sparsity=0.5, step=1.0, guard=False, batch_size=8)
    kept = timed[0].model
    large = [t for t in kept.graph.initializer if np.prod(t.dims) > 64]
    assert large and all(not t.raw_data and t.data_location == TensorProto.EXTERNAL for t in large)
    assert len(kept.graph.node) == len(load_model(model).graph.node)


def test_compress_builds_one_session_per_model(rng, tmp_path, monkeypatch):
    """The original's session serves the reference outputs and the latency; the pruned model's
    serves the guard and surgery's check; the rewritten model's its check, evaluation and latency."""
    import egp_onnx.runtime.handle as handle

    built = []
    real = handle.make_session

    def counting(model, *args, **kwargs):
        built.append(model.graph.name)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(handle, "make_session", counting)
    model, calib = toy_files(tmp_path, rng)
    result = egp_onnx.compress(model, calib, sparsity=0.5, step=1.0, guard=False, batch_size=8)
    assert len(result.report.steps) == 1 and result.report.timing is not None
    assert not result.report.surgery.reverted
    assert len(built) == 3
