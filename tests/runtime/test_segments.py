"""Activations: a model's tensors computed segment by segment equal the whole model's, each node once."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import Builder, f32
from onnx import helper
from references import reference_activations, spins

from egp_onnx.graph.weights import initializer_arrays, split_weights
from egp_onnx.runtime.segments import Activations
from egp_onnx.runtime.session import make_session

LAYERS = ["c0", "c1", "c2", "fc"]


def residual_model(rng) -> onnx.ModelProto:
    """x -> c0 -> Relu r0 -> c1 -> Relu r1 -> c2 -> BN -> Add(+r0) -> Relu r2 -> GAP -> Flatten -> fc"""
    b = Builder(rng)
    a = b.op("Relu", [b.conv("x", "c0", 3, 4, 3, pad=1)], "r0")
    h = b.op("Relu", [b.conv(a, "c1", 4, 4, 3, pad=1)], "r1")
    s = b.op("Add", [b.bn(b.conv(h, "c2", 4, 4, 3, pad=1), "bn", 4), a], "add")
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [s], "r2")], "gap")], "flat")
    return b.model(b.gemm(pooled, "fc", 4, 5), ("N", 3, 6, 6))


def whole(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    """The named tensors from one plain run of the whole model (reference)."""
    values = reference_activations(model, names, {"x": x})
    return [values[n] for n in names]


def batches_of(x: np.ndarray, size: int) -> list[dict[str, np.ndarray]]:
    return [{"x": x[i : i + size]} for i in range(0, len(x), size)]


def activations(model, x, size=4, budget=2**30, weights=None, threads=0):
    stubbed, values = split_weights(model, always=[f"{n}.w" for n in LAYERS])
    if weights is not None:
        values.update(weights)
    return Activations(stubbed, values, batches_of(x, size), budget, threads), values


def test_requests_in_layer_order_match_the_whole_model_and_run_each_node_once(rng):
    model = residual_model(rng)
    x = f32(rng.normal(size=(10, 3, 6, 6)))  # batches of 4, 4 and 2
    acts, _ = activations(model, x)
    requests = [["x"], ["r0"], ["r1", "r0"], ["flat"], ["y"]]
    for k, names in enumerate(requests):
        later = {n for later in requests[k + 1 :] for n in later}
        got = acts.get(names, later)
        for name, expected in zip(names, whole(model, names, x), strict=True):
            np.testing.assert_allclose(np.concatenate(got[names.index(name)]), expected, rtol=1e-5, atol=1e-5)
    # four requests computed something, and no node ran twice
    assert acts.sessions == 4
    assert acts.done == set(range(len(model.graph.node)))


def test_dead_tensors_are_dropped_and_live_ones_kept(rng):
    model = residual_model(rng)
    acts, _ = activations(model, f32(rng.normal(size=(8, 3, 6, 6))))
    acts.get(["r1"], later={"flat"})
    # r0 is still read by the Add (not run yet); x stays (graph input); nothing else is kept
    assert set(acts.cache) == {"x", "r0", "r1"}
    acts.get(["flat"], later=set())
    assert set(acts.cache) == {"x", "flat"}


def test_weights_changed_between_requests_reach_the_nodes_that_run_later(rng):
    model = residual_model(rng)
    x = f32(rng.normal(size=(6, 3, 6, 6)))
    acts, values = activations(model, x)
    acts.get(["r0"], later={"r1"})
    changed = {"c1.w": np.zeros_like(values["c1.w"]), "c0.w": np.zeros_like(values["c0.w"])}
    values.update(changed)  # c0 already ran: its new value must not matter; c1 runs next
    (r1,) = acts.get(["r1"])
    reference = dict(initializer_arrays(model, ["c1.w"]))
    assert not np.allclose(reference["c1.w"], 0)
    edited = residual_model(np.random.default_rng(0))  # a fresh copy to edit
    edited.CopyFrom(model)
    for t in edited.graph.initializer:
        if t.name == "c1.w":
            t.CopyFrom(helper.make_tensor("c1.w", t.data_type, t.dims, changed["c1.w"].ravel()))
    (expected,) = whole(edited, ["r1"], x)
    np.testing.assert_allclose(np.concatenate(r1), expected, rtol=1e-5, atol=1e-6)


def test_a_small_budget_keeps_the_first_batches_only(rng):
    model = residual_model(rng)
    x = f32(rng.normal(size=(12, 3, 6, 6)))
    # one batch of 4 samples holds x and r0: 2 * 4 * 4*36 floats + x's 4 * 3*36 floats
    per_batch = 4 * 3 * 36 * 4 + 4 * 4 * 36 * 4
    acts, _ = activations(model, x, budget=2 * per_batch)
    (r0,) = acts.get(["r0"], later={"r1"})
    assert acts.batches == 2 and len(r0) == 2 and all(len(acts.cache[n]) == 2 for n in acts.cache)
    (expected,) = whole(model, ["r0"], x[:8])
    np.testing.assert_allclose(np.concatenate(r0), expected, rtol=1e-5, atol=1e-5)
    # r1 joins x and r0 in the cache: three tensors a batch, so only the first batch fits now
    (r1,) = acts.get(["r1"])
    assert acts.batches == 1 and len(r1) == 1
    (expected,) = whole(model, ["r1"], x[:4])
    np.testing.assert_allclose(r1[0], expected, rtol=1e-5, atol=1e-5)


def test_a_part_keeps_the_same_batches_alone_as_with_the_others(rng):
    """Each part has its own budget, decided from its own first batch: a cluster worker holding
    one part keeps what one process holding them all keeps of it (reconstruct/parts.py)."""
    model = residual_model(rng)
    x = f32(rng.normal(size=(28, 3, 6, 6)))  # 7 batches of 4: parts of 3, 2 and 2 batches
    per_batch = 4 * 3 * 36 * 4 + 4 * 4 * 36 * 4
    stubbed, values = split_weights(model, always=[f"{n}.w" for n in LAYERS])
    batches = batches_of(x, 4)
    together = Activations(stubbed, values, batches, [2 * per_batch] * 3, 0, [3, 2, 2])
    alone = [Activations(stubbed, values, batches[a:b], 2 * per_batch) for a, b in [(0, 3), (3, 5), (5, 7)]]
    for names, later in [(["r0"], {"r1"}), (["r1"], set())]:
        (found,) = together.get(names, later)
        parts = [acts.get(names, later)[0] for acts in alone]
        assert together.part_of == [p for p, kept in enumerate(parts) for _ in kept]
        for a, b in zip(found, [t for kept in parts for t in kept], strict=True):
            np.testing.assert_array_equal(a, b)
    assert together.part_of == [0, 1, 2]  # three tensors a batch: one batch of each part fits


def test_segment_sessions_do_not_spin_and_take_the_thread_count(rng, monkeypatch):
    # Between runs the caller computes with numpy's BLAS threads; spinning onnxruntime workers
    # would take those cores. Reconstruction runs two models' segments at once, each on its share.
    import egp_onnx.runtime.segments as segments

    built = []

    def recording(*args, **kwargs):
        built.append(make_session(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(segments, "make_session", recording)
    acts, _ = activations(residual_model(rng), f32(rng.normal(size=(4, 3, 6, 6))), threads=1)
    acts.get(["r1"], later={"y"})
    acts.get(["y"])
    assert len(built) == 2 and not any(spins(session) for session in built)
    assert [s.get_session_options().intra_op_num_threads for s in built] == [1, 1]


def test_no_batches_is_an_error(rng):
    with pytest.raises(ValueError, match="no batches"):
        Activations(residual_model(rng), {}, [], 2**20)


def symbolic_model(rng) -> onnx.ModelProto:
    """the residual model's convolutions, on x(N, 3, H, W): c0 -> Relu r0 -> c1 -> Relu r1 -> c2 -> y"""
    b = Builder(rng)
    a = b.op("Relu", [b.conv("x", "c0", 3, 4, 3, pad=1)], "r0")
    h = b.op("Relu", [b.conv(a, "c1", 4, 4, 3, pad=1)], "r1")
    return b.model(b.conv(h, "c2", 4, 4, 3, pad=1), ("N", 3, "H", "W"))


def test_batches_of_several_sizes_in_turn_run_segment_by_segment(rng):
    # 6x6, 9x5, 6x6: a segment fed a kept tensor declares only the dims every batch shares (the
    # first and the last batch agree here, the middle one does not).
    model = symbolic_model(rng)
    batches = [{"x": f32(rng.normal(size=(n, 3, h, w)))} for n, h, w in ((4, 6, 6), (3, 9, 5), (2, 6, 6))]
    acts = Activations(*split_weights(model), batches, 2**30)
    (r0,) = acts.get(["r0"], later={"r1"})
    (r1,) = acts.get(["r1"], later={"y"})
    (y,) = acts.get(["y"])
    for k, batch in enumerate(batches):
        for name, got in (("r0", r0), ("r1", r1), ("y", y)):
            (expected,) = whole(model, [name], batch["x"])
            np.testing.assert_allclose(got[k], expected, rtol=1e-5, atol=1e-5)
    assert acts.sessions == 3


def test_the_budget_counts_larger_images_as_larger(rng):
    # Batch 0 holds 4 samples of 6x6: x and r0 take 4 * (3 + 4) * 36 floats. The second batch's
    # images are 12x12, four times the bytes per sample: batches 0 and 1 (five batch 0s) fit a
    # budget of five and a half, the third does not (counted by batch 0's size, all four would).
    model = symbolic_model(rng)
    batches = [{"x": f32(rng.normal(size=(4, 3, h, h)))} for h in (6, 12, 6, 6)]
    per_batch = 4 * (3 + 4) * 36 * 4
    acts = Activations(*split_weights(model), batches, 5 * per_batch + per_batch // 2)
    (r0,) = acts.get(["r0"], later={"r1"})
    assert acts.batches == 2 and [a.shape[2] for a in r0] == [6, 12]
