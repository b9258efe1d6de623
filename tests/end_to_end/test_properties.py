"""Property-based tests: random small conv/gemm/relu graphs and random data.

CI runs each property with at least 200 examples (the `ci` profile, chosen when CI is set);
a local run uses fewer.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from conftest import compress_plain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import Builder
from references import lexsort_global_amounts, lexsort_prune_smallest, reference_activations, run_ort

from egp_onnx.calibrate.collect import collect_statistics
from egp_onnx.graph.rectifiers import find_rectifiers
from egp_onnx.load.calibration import in_memory, input_specs
from egp_onnx.load.model import prepare_model
from egp_onnx.prune.budget import egp_allocation, global_magnitude_amounts, integer_amounts, prune_smallest

settings.register_profile(
    "ci", max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@st.composite
def networks(draw):
    """A random CNN or MLP with ReLUs, built with onnx.helper, and its calibration data."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    b = Builder(rng)
    if draw(st.booleans()):
        channels, size = draw(st.integers(1, 4)), draw(st.integers(4, 7))
        h, c = "x", channels
        for i in range(draw(st.integers(1, 3))):
            k = draw(st.sampled_from([1, 3]))
            stride = draw(st.sampled_from([1, 1, 2]))
            out = draw(st.integers(2, 6))
            conv = b.conv(
                h, f"conv{i}", c, out, k, stride, k // 2, bias=draw(st.sampled_from([None, 0.0, 0.5, -0.5]))
            )
            z = b.bn(conv, f"bn{i}", out) if draw(st.booleans()) else conv
            if stride == 1 and out == c and draw(st.booleans()):
                z = b.op("Add", [z, h], f"add{i}")
            h, c = b.op("Relu", [z], f"relu{i}"), out
        h = b.op("Flatten", [b.op("GlobalAveragePool", [h], "gap")], "flatten")
        shape = (channels, size, size)
    else:
        c = draw(st.integers(2, 6))
        h, shape = "x", (c,)
    for i in range(draw(st.integers(1, 2))):
        out = draw(st.integers(2, 6))
        h, c = b.op("Relu", [b.gemm(h, f"fc{i}", c, out)], f"fc{i}.relu"), out
    model = b.model(b.gemm(h, "head", c, 3), ["N", *shape])
    x = rng.normal(size=(draw(st.integers(1, 12)), *shape)).astype(np.float32)
    return model, x


def rel(want: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-6))


@given(networks(), st.integers(1, 5))
def test_counts_match_numpy(network, batch_size):
    model, x = network
    proto = prepare_model(model)
    sites = find_rectifiers(proto)
    data = in_memory(input_specs(proto), {"x": x}, None, "random")
    stats = collect_statistics(proto, sites, data, batch_size)
    values = reference_activations(proto, [s.input for s in sites], {"x": x})
    for site in sites:
        z = values[site.input]
        per_channel = np.moveaxis(z, 1, 0).reshape(z.shape[1], -1)
        np.testing.assert_array_equal(stats.counts[site.name].on, (per_channel > 0).sum(axis=1))
        assert stats.counts[site.name].total == per_channel.shape[1]


@given(networks())
def test_sparsity_zero_keeps_outputs(network):
    model, x = network
    data = in_memory(input_specs(model), {"x": x}, None, "random")
    result = compress_plain(model, data, sparsity=0.0, latency=False)
    assert not result.report.surgery.reverted, result.report.surgery.revert_reason
    assert rel(run_ort(model, {"x": x})[0], run_ort(result.model, {"x": x})[0]) < 1e-5


@given(networks(), st.sampled_from([0.3, 0.6, 0.9]))
def test_surgery_preserves_the_pruned_model(network, sparsity):
    model, x = network
    data = in_memory(input_specs(model), {"x": x}, None, "random")
    plain = compress_plain(model, data, sparsity=sparsity, surgery=False, latency=False).model
    shallow = compress_plain(model, data, sparsity=sparsity, latency=False)
    assert not shallow.report.surgery.reverted, shallow.report.surgery.revert_reason
    onnx.checker.check_model(shallow.model)
    assert shallow.report.model.depth_after <= shallow.report.model.depth_before
    assert rel(run_ort(plain, {"x": x})[0], run_ort(shallow.model, {"x": x})[0]) < 1e-4


@given(
    st.lists(
        st.tuples(st.floats(0, 1), st.floats(1e-4, 10), st.integers(0, 10_000)), min_size=1, max_size=12
    ),
    st.floats(0, 1),
)
def test_budget_never_exceeds_a_layer(layers, fraction):
    entropy, mean_abs, nnz = (np.array(v) for v in zip(*layers, strict=True))
    participating = (entropy > 0) & (nnz > 0)
    budget = int(fraction * nnz[participating].sum())
    amounts = egp_allocation(entropy, mean_abs, nnz, budget)
    assert (amounts <= nnz + 1e-6 * np.maximum(nnz, 1)).all()
    assert (amounts[~participating] == 0).all()
    assert amounts.sum() <= budget + 1e-6 * max(budget, 1)
    counts = integer_amounts(amounts, nnz, budget)
    assert (counts <= nnz).all() and (counts >= 0).all()
    assert counts.sum() == min(budget, int(nnz[participating].sum()))


def tied_weights(draw, size: int) -> np.ndarray:
    """Weights from a handful of magnitudes of either sign, zeros included: ties everywhere."""
    levels = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, np.nan]), min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    picks = rng.choice(np.array(levels, dtype=np.float32), size=size)
    return (picks * rng.choice(np.array([-1, 1], dtype=np.float32), size=size)).astype(np.float32)


@given(st.data(), st.integers(1, 300), st.integers(-2, 320), st.integers(0, 2**16))
def test_partition_prune_equals_lexsort_prune(data, size, count, seed):
    weights = tied_weights(data.draw, size).reshape(-1, 1 if size % 2 else 2)
    rng_new, rng_old = np.random.default_rng(seed), np.random.default_rng(seed)
    got = prune_smallest(weights, count, rng_new)
    want = lexsort_prune_smallest(weights, count, rng_old)
    np.testing.assert_array_equal(got, want)
    assert rng_new.integers(2**62) == rng_old.integers(2**62), "the generator advances alike"


@given(st.data(), st.lists(st.integers(0, 120), min_size=1, max_size=5), st.integers(-1, 700))
def test_partition_global_amounts_equal_lexsort(data, sizes, budget):
    weights = [tied_weights(data.draw, n) for n in sizes]
    np.testing.assert_array_equal(
        global_magnitude_amounts(weights, budget), lexsort_global_amounts(weights, budget)
    )
