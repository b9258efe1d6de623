"""In-graph ON counts and entropies against a numpy reference on activations read out of onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from models import conv_bn_relu, gemm_head, inputs, mixed_ranks, residual_block, single_conv
from references import reference_activations

from egp_onnx.calibrate.collect import collect_statistics
from egp_onnx.entropy import ChannelCounts, binary_entropy
from egp_onnx.graph.rectifiers import find_rectifiers
from egp_onnx.graph.weights import split_weights
from egp_onnx.load.calibration import open_calibration
from egp_onnx.load.model import prepare_model


def reference_entropy(z: np.ndarray, channel_axis: int) -> tuple[np.ndarray, float]:
    """Counts and layer entropy written out directly from shared/EGP.md section 2."""
    moved = np.moveaxis(z, channel_axis, 0).reshape(z.shape[channel_axis], -1)
    on = (moved > 0).sum(axis=1)
    p = on / moved.shape[1]
    varying = (p > 0) & (p < 1)
    if not varying.any():
        return on, 0.0
    h = [-q * np.log2(max(q, 1e-5)) - (1 - q) * np.log2(max(1 - q, 1e-5)) for q in p[varying]]
    return on, float(np.mean(h))


BUILDERS = {
    "single_conv": single_conv,
    "conv_bn_relu": conv_bn_relu,
    "residual": residual_block,
    "gemm_head": gemm_head,
    "mixed_ranks": mixed_ranks,
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_counts_match_numpy_reference(name, batch_size, tmp_path, rng):
    model = prepare_model(BUILDERS[name](rng))
    channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    x = inputs(rng, n=13, shape=(channels, 6, 6))
    np.savez(tmp_path / "calib.npz", x=x)
    sites = find_rectifiers(model)
    assert sites, "every test model has rectifiers"
    stats = collect_statistics(model, sites, open_calibration(tmp_path / "calib.npz", model), batch_size)
    assert stats.samples == 13
    reference = reference_activations(model, [s.input for s in sites], {"x": x})
    from egp_onnx.entropy import layer_entropy

    for site in sites:
        z = reference[site.input]
        on, h = reference_entropy(z, z.ndim - 1 if site.channel_last else 1)
        got = stats.counts[site.name]
        np.testing.assert_array_equal(got.on, on)
        assert got.total == z.size // z.shape[z.ndim - 1 if site.channel_last else 1]
        assert layer_entropy(got.on, got.total) == pytest.approx(h, abs=1e-6)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_fast_and_general_probes_agree(name, rng, tmp_path, monkeypatch):
    model = prepare_model(BUILDERS[name](rng))
    channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=9, shape=(channels, 6, 6)))
    sites = find_rectifiers(model)
    fast = collect_statistics(model, sites, open_calibration(tmp_path / "c.npz", model), 4)
    # shapes that do not resolve send every batch through the general probes
    monkeypatch.setattr("egp_onnx.calibrate.collect.static_shapes", lambda *args: {})
    general = collect_statistics(model, sites, open_calibration(tmp_path / "c.npz", model), 4)
    for site in sites:
        np.testing.assert_array_equal(fast.counts[site.name].on, general.counts[site.name].on)
        assert fast.counts[site.name].total == general.counts[site.name].total


def test_opset_11_uses_axes_attribute(tmp_path, rng):
    model = prepare_model(single_conv(rng, opset=11))
    x = inputs(rng, n=5)
    np.savez(tmp_path / "c.npz", x=x)
    sites = find_rectifiers(model)
    stats = collect_statistics(model, sites, open_calibration(tmp_path / "c.npz", model), 2)
    z = reference_activations(model, ["z"], {"x": x})["z"]
    np.testing.assert_array_equal(stats.counts["relu"].on, (z > 0).sum(axis=(0, 2, 3)))


def test_counts_merge_across_shards(tmp_path, rng):
    model = prepare_model(single_conv(rng))
    x = inputs(rng, n=20)
    np.savez(tmp_path / "all.npz", x=x)
    (tmp_path / "parts").mkdir()
    np.savez(tmp_path / "parts" / "a.npz", x=x[:7])
    np.savez(tmp_path / "parts" / "b.npz", x=x[7:])
    sites = find_rectifiers(model)
    whole = collect_statistics(model, sites, open_calibration(tmp_path / "all.npz", model), 6).counts["relu"]
    a = collect_statistics(model, sites, open_calibration(tmp_path / "parts" / "a.npz", model), 6).counts[
        "relu"
    ]
    b = collect_statistics(model, sites, open_calibration(tmp_path / "parts" / "b.npz", model), 6).counts[
        "relu"
    ]
    folder = collect_statistics(model, sites, open_calibration(tmp_path / "parts", model), 6).counts["relu"]
    merged = a.merged(b)
    for counts in (merged, folder):
        np.testing.assert_array_equal(counts.on, whole.on)
        assert counts.total == whole.total


def test_channel_counts_entropy_matches_formula():
    counts = ChannelCounts(np.array([0, 5, 10, 3]), 10)
    p = counts.on / counts.total
    assert binary_entropy(p[1]) == pytest.approx(1.0)
    assert binary_entropy(p[3]) == pytest.approx(-(0.3 * np.log2(0.3) + 0.7 * np.log2(0.7)))


def test_a_rejected_batch_stops_the_pass_with_batches_in_flight(tmp_path, rng, monkeypatch):
    """x(N,3,6,6) -> Conv Relu -> y (single_conv); the third of five batches fails in its thread."""
    from egp_onnx.calibrate import collect as calibrate

    model = prepare_model(single_conv(rng))
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=10))
    run, calls = calibrate.ProbeTotals.run, []

    def failing(self, feed, spatial):
        calls.append(len(calls))
        if len(calls) == 3:
            raise calibrate.CalibrationError("onnxruntime rejected a batch: test")
        return run(self, feed, spatial)

    monkeypatch.setattr(calibrate.ProbeTotals, "run", failing)
    done = []
    with pytest.raises(calibrate.CalibrationError, match="rejected a batch: test"):
        collect_statistics(
            model, find_rectifiers(model), open_calibration(tmp_path / "c.npz", model), 2, done.append
        )
    assert sum(done) < 10


def test_known_weights_are_used_as_they_are_and_count_the_same(rng, tmp_path, monkeypatch):
    import egp_onnx.graph.weights as topology

    model = prepare_model(residual_block(rng))
    sites = find_rectifiers(model)
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=12, shape=(4, 6, 6)))
    data = open_calibration(tmp_path / "c.npz", model)
    _, weights = split_weights(model)
    plain = collect_statistics(model, sites, data, 4)
    read = []
    real = topology.numpy_helper.to_array
    monkeypatch.setattr(topology.numpy_helper, "to_array", lambda t, *a: read.append(t.name) or real(t, *a))
    known = collect_statistics(model, sites, data, 4, known=weights)
    assert weights and not set(read) & set(weights), "the known weights are not read again"
    assert known.samples == plain.samples
    for name, counts in plain.counts.items():
        np.testing.assert_array_equal(known.counts[name].on, counts.on)
        assert known.counts[name].total == counts.total
