"""Latency: interleaved runs, warm-up, budget, batch sizes, and the report's timing section."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import SAMPLES
from models import _init, _model, _x, _y, inputs, single_conv
from onnx import helper
from references import spins

import egp_onnx
from egp_onnx.report.render import compression_summary
from egp_onnx.runtime.handle import ModelHandle
from egp_onnx.runtime.session import STATISTICS, make_session
from egp_onnx.verify.latency import LATENCY_MIN_RUNS, common_feed, compare_latency, latency_feeds


def heavy_conv(rng: np.random.Generator, channels: int = 64):
    """
    x(N,3,6,6) -> Conv3x3(3->C) -> Relu -> Conv3x3(C->C) x3 (each + Relu) -> Conv1x1(C->4) -> y
    """
    nodes, inits, h, c = [], [], "x", 3
    for i in range(4):
        inits.append(_init(f"w{i}", rng.normal(size=(channels, c, 3, 3)) * 0.1))
        nodes.append(helper.make_node("Conv", [h, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        h, c = f"r{i}", channels
    inits.append(_init("head", rng.normal(size=(4, c, 1, 1))))
    nodes.append(helper.make_node("Conv", [h, "head"], ["y"]))
    return _model(nodes, [_x()], [_y((4, 6, 6))], inits)


def test_both_batch_sizes_with_median_and_spread(rng):
    model = single_conv(rng)
    feed = {"x": inputs(rng, 4)}
    timing = compare_latency(model, model, latency_feeds(model, feed), budget_s=0.05, max_runs=50)
    assert [t.batch_size for t in timing.batches] == [1, 4]
    assert timing.optimization == "ORT_ENABLE_ALL"
    for t in timing.batches:
        assert LATENCY_MIN_RUNS <= t.runs <= 50
        assert t.median_ms_before > 0 and t.median_ms_after > 0
        assert t.iqr_ms_before >= 0 and t.iqr_ms_after >= 0
        assert t.speedup == pytest.approx(t.median_ms_before / t.median_ms_after)


def test_runs_stop_at_the_count_or_the_budget(rng):
    model = single_conv(rng)
    feed = {"x": inputs(rng, 2)}
    capped = compare_latency(model, model, [feed], budget_s=60.0, max_runs=5)
    assert capped.batches[0].runs == 5
    start = time.perf_counter()
    budgeted = compare_latency(model, model, [feed], budget_s=0.05, max_runs=10**9)
    assert time.perf_counter() - start < 5.0
    assert budgeted.batches[0].runs >= LATENCY_MIN_RUNS


def test_a_heavier_model_is_measured_as_slower(rng):
    """Before and after are not swapped: 4 convolutions of 64 channels vs one of 4 channels."""
    light, heavy = single_conv(rng), heavy_conv(rng)
    timing = compare_latency(heavy, light, [{"x": inputs(rng, 8)}], budget_s=0.2, max_runs=100)
    record = timing.batches[0]
    assert record.median_ms_before > record.median_ms_after
    assert record.speedup > 1.5


def test_a_fixed_batch_is_measured_at_that_batch_only(rng):
    model = single_conv(rng)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3  # N -> 3
    feed = {"x": inputs(rng, 3)}
    assert [next(iter(f.values())).shape[0] for f in latency_feeds(model, feed)] == [3]
    single = {"x": inputs(rng, 1)}
    assert len(latency_feeds(single_conv(rng), single)) == 1


def test_compress_reports_latency_at_batch_1_and_the_calibration_batch():
    model, calib = SAMPLES / "digits_resnet.onnx", SAMPLES / "digits_calib.npz"
    report = egp_onnx.compress(model, calib, sparsity=0.5).report
    assert report.timing is not None
    assert [t.batch_size for t in report.timing.batches] == [1, 32]
    text = compression_summary(report, [])
    assert "batch 1:" in text and "batch 32:" in text and "IQR" in text


def test_timed_sessions_do_not_spin_and_are_built_alike(rng):
    # Both sides of a latency comparison come from ModelHandle.of (a handle passes through), with
    # onnxruntime's thread spinning off: spinning workers of one session slow the other's runs.
    model = single_conv(rng)
    assert not spins(ModelHandle.of(model).session) and not spins(ModelHandle.of(ModelHandle(model)).session)
    assert spins(make_session(model, STATISTICS))


def test_sessions_that_have_run_the_batch_shape_skip_the_warmup(rng, monkeypatch):
    import egp_onnx.verify.latency as latency

    calls = []
    real = latency.run_session

    def counting(session, names, feed):
        calls.append(next(iter(feed.values())).shape[0])
        return real(session, names, feed)

    monkeypatch.setattr(latency, "run_session", counting)
    model = single_conv(rng)
    feed = {"x": inputs(rng, 4)}
    runs = {"budget_s": 0.0, "max_runs": LATENCY_MIN_RUNS}
    compare_latency(model, model, [feed], **runs)
    assert len(calls) == 2 * (LATENCY_MIN_RUNS + 1), "fresh sessions: one untimed run each first"
    before, after = ModelHandle(model), ModelHandle(model)
    before.run(None, feed)
    after.run(None, feed)
    calls.clear()
    timing = compare_latency(before, after, [{"x": feed["x"][:1]}, feed], **runs)
    assert [t.runs for t in timing.batches] == [LATENCY_MIN_RUNS, LATENCY_MIN_RUNS]
    assert calls.count(1) == 2 * (LATENCY_MIN_RUNS + 1), "batch 1 is a new shape for both: warmed up"
    assert calls.count(4) == 2 * LATENCY_MIN_RUNS, "batch 4 has run in both sessions: timed at once"


def test_the_stated_feed_is_the_largest_batch_of_the_most_common_shape():
    def feed(n, h, w):
        return {"x": np.zeros((n, 3, h, w), np.float32)}

    small, large = feed(1, 8, 8), feed(4, 8, 8)
    batches = [feed(3, 5, 5), small, feed(4, 5, 5), large, feed(4, 8, 8), feed(2, 6, 6)]
    assert common_feed(batches) is large, "8x8: 9 samples, 5x5: 7; its first batch of 4"
    one = [feed(4, 8, 8), feed(4, 8, 8), feed(2, 8, 8)]
    assert common_feed(one) is one[0], "one shape: the first batch, as before"
    tie = [feed(2, 5, 5), feed(2, 8, 8)]
    assert common_feed(tie) is tie[0], "a tie: the shape seen first"
