"""Reconstruction end to end: refit layers recover, residual targets, masks, determinism, limits."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, load_npz
from models import Builder, f32
from references import reference_activations, run_ort
from refit_models import CONVS, conv_model, correlated, data_for, rel, residual_model

from egp_onnx.graph.layers import LinearLayer, linear_layers
from egp_onnx.graph.weights import initializer_arrays, replace_initializers, split_weights
from egp_onnx.load.calibration import open_calibration
from egp_onnx.load.model import load_model
from egp_onnx.prune.budget import prune_smallest
from egp_onnx.prune.limits import sparsity_limits
from egp_onnx.reconstruct import normal, solve
from egp_onnx.reconstruct import refit as rc
from egp_onnx.report.records import StepRecord
from egp_onnx.report.render import steps_table
from egp_onnx.runtime.segments import Activations


def test_known_layer_is_recovered(rng):
    # The dense layer's weights are already 40% zero; the current model holds other values on the
    # same support plus one tiny extra weight. Pruning that one weight and refitting must give back
    # the dense layer (up to the ridge's shrinkage), whatever the current values were.
    model = conv_model(rng, **CONVS["plain"])
    w = initializer_arrays(model, ["conv.w"])["conv.w"]
    w[rng.random(w.shape) < 0.4] = 0.0
    dense = replace_initializers(model, {"conv.w": w})
    start = np.where(w != 0, rng.normal(size=w.shape), 0.0).astype(np.float32)
    start.flat[np.flatnonzero(w == 0)[0]] = 1e-7  # the one weight that magnitude pruning takes
    current = replace_initializers(model, {"conv.w": start})
    data = data_for(model, f32(rng.normal(size=(64, 4, 9, 9))))
    result = rc.reconstruct(dense, current, data, 16, remove={"conv.w": 1}, masked=["conv.w"])
    got = initializer_arrays(result.model, ["conv.w", "conv.b"])
    assert np.array_equal(got["conv.w"] != 0, w != 0), "the support is the dense one"
    np.testing.assert_allclose(got["conv.w"], w, rtol=0, atol=5e-3 * np.abs(w).max())
    want_b = initializer_arrays(dense, ["conv.b"])["conv.b"]
    np.testing.assert_allclose(got["conv.b"], want_b, atol=5e-3)
    (fit,) = result.fits
    assert fit.status == "refit" and fit.error_after < 1e-4 < fit.error_before


def test_a_layer_left_without_weights_is_marked_and_not_the_steps_worst(rng):
    # Every weight removed: only the bias is fit, the error stays about 1, and the steps table's
    # "worst layer error" shows the layers that still have weights.
    model = conv_model(rng, **CONVS["plain"])
    w = initializer_arrays(model, ["conv.w"])["conv.w"]
    data = data_for(model, f32(rng.normal(size=(32, 4, 9, 9))))
    (emptied,) = rc.reconstruct(model, model, data, 16, remove={"conv.w": w.size}, masked=["conv.w"]).fits
    assert emptied.status == rc.EMPTIED and emptied.error_after > 0.5
    (kept,) = rc.reconstruct(model, model, data, 16, remove={"conv.w": w.size // 2}, masked=["conv.w"]).fits
    assert kept.status == "refit"
    step = StepRecord(1, "egp", 10, 0.5, True, None, None, 0, 1, reconstructed=(emptied, kept))
    row = steps_table(SimpleNamespace(steps=[step])).splitlines()[-1]
    assert f"{kept.error_before:.2e} -> {kept.error_after:.2e}" in row
    assert f"{emptied.error_before:.2e} ->" not in row


def test_too_few_rows_leaves_the_layer_pruned_by_magnitude_and_says_how_many(rng):
    # One sample x 90 positions (10 x 9) = 90 rows for 37 columns: more rows than columns, but too few
    # (MIN_ROWS_PER_COLUMN) for the ridge fit to beat the pruned weights on other inputs: no refit.
    model = conv_model(rng, **CONVS["plain"])
    w = initializer_arrays(model, ["conv.w"])["conv.w"]
    data = data_for(model, f32(rng.normal(size=(1, 4, 9, 9))))
    result = rc.reconstruct(model, model, data, 1, remove={"conv.w": 10}, masked=["conv.w"])
    (fit,) = result.fits
    assert fit.columns == w[0].size + 1 and 90 < normal.MIN_ROWS_PER_COLUMN * fit.columns
    assert fit.status == f"not refit: 90 rows < {normal.MIN_ROWS_PER_COLUMN} x {fit.columns} columns"
    expected = prune_smallest(w, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(initializer_arrays(result.model, ["conv.w"])["conv.w"], expected)


def test_a_refit_that_fits_its_rows_worse_than_the_pruned_layer_is_not_applied(rng):
    # White-noise inputs make the pruned weights the least-squares answer on their support
    # already: the ridge's shrinkage could only add error, so the layer keeps its pruned weights.
    model = conv_model(rng, **CONVS["plain"])
    w = initializer_arrays(model, ["conv.w"])["conv.w"]
    data = data_for(model, f32(rng.normal(size=(30, 4, 9, 9))))
    result = rc.reconstruct(model, model, data, 30, remove={"conv.w": 10}, masked=["conv.w"])
    (fit,) = result.fits
    assert fit.status.startswith("not refit: the refit's error") and fit.error_after is None
    expected = prune_smallest(w, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(initializer_arrays(result.model, ["conv.w"])["conv.w"], expected)


def test_few_samples_with_many_positions_give_the_layer_its_rows_per_column(rng):
    # 30 samples of 90 positions for 37 columns: ROWS_PER_COLUMN x 37 = 2368 rows need 79
    # positions a sample. The old cap of 64 positions a sample gave 1920 rows (RapidOCR's
    # det: 24 pages of 100k+ positions refit on a few hundred rows, which moved its map).
    model = conv_model(rng, **CONVS["plain"])
    data = data_for(model, correlated(rng, 30, 4))
    (fit,) = rc.reconstruct(model, model, data, 30, remove={"conv.w": 10}, masked=["conv.w"]).fits
    assert 64 * 30 < normal.ROWS_PER_COLUMN * fit.columns <= 30 * 90
    assert fit.status == "refit" and fit.rows >= normal.ROWS_PER_COLUMN * fit.columns


@pytest.mark.parametrize("name", CONVS)
def test_pruned_conv_refit_beats_pruning_alone_on_held_out_data(rng, name):
    model = conv_model(rng, **CONVS[name])
    cin = CONVS[name]["cin"]
    x = correlated(rng, 128, cin)  # one distribution: fit on 96 samples, judge on the other 32
    fit_data, held = data_for(model, x[:96]), x[96:]
    w = initializer_arrays(model, ["conv.w"])["conv.w"]
    count = w.size // 2
    pruned = replace_initializers(model, {"conv.w": prune_smallest(w, count, np.random.default_rng(0))})
    result = rc.reconstruct(model, model, fit_data, 32, remove={"conv.w": count}, masked=["conv.w"], seed=0)
    refit = initializer_arrays(result.model, ["conv.w"])["conv.w"]
    assert np.count_nonzero(refit) == w.size - count
    np.testing.assert_array_equal(refit == 0, initializer_arrays(pruned, ["conv.w"])["conv.w"] == 0)
    (dense_y,), (pruned_y,), (refit_y,) = (run_ort(m, {"x": held}) for m in (model, pruned, result.model))
    assert rel(refit_y, dense_y) < 0.9 * rel(pruned_y, dense_y)


@pytest.mark.parametrize("op", ["gemm", "gemm-transB", "matmul"])
def test_dense_layers_refit_with_either_layout(rng, op):
    """
    x(N,12) -> Gemm/MatMul(12->8) "fc" -> y
    """
    b = Builder(rng)
    w = rng.normal(size=(8, 12) if op == "gemm-transB" else (12, 8))
    inputs = ["x", b.init("fc.w", w)]
    if op == "matmul":
        b.op("MatMul", inputs, "fc")
    else:
        b.nodes.append(
            onnx.helper.make_node(
                "Gemm",
                [*inputs, b.init("fc.b", rng.normal(size=8))],
                ["fc"],
                name="fc",
                transB=int(op == "gemm-transB"),
                alpha=0.5,
                beta=2.0,
            )
        )
    model = b.model("fc", ("N", 12))
    mix = rng.normal(size=(12, 12)) + 2 * np.eye(12)
    x, held = (f32(rng.normal(size=(n, 12)) @ mix + 0.5) for n in (200, 50))
    count = w.size // 2
    pruned = replace_initializers(model, {"fc.w": prune_smallest(f32(w), count, np.random.default_rng(0))})
    result = rc.reconstruct(model, model, data_for(model, x), 50, remove={"fc.w": count}, masked=["fc.w"])
    refit = initializer_arrays(result.model, ["fc.w"])["fc.w"]
    assert np.count_nonzero(refit) == w.size - count
    # An independent reference: per output, ridge least squares on the kept inputs (numpy).
    (dense_x_y,) = run_ort(model, {"x": x})
    mask = initializer_arrays(pruned, ["fc.w"])["fc.w"] != 0
    kept = mask.T if op == "gemm-transB" else mask  # (12 inputs, 8 outputs)
    bias = op != "matmul"
    expected = np.zeros((12, 8))
    scale = 0.5 if op != "matmul" else 1.0
    a = np.hstack([x, np.ones((len(x), 1))]) if bias else x.astype(np.float64)
    gram = a.T @ a
    lam = solve.RIDGE * np.diag(gram)[:12].mean()
    for o in range(8):
        idx = np.concatenate([np.flatnonzero(kept[:, o]), [12]]) if bias else np.flatnonzero(kept[:, o])
        system = gram[np.ix_(idx, idx)] + lam * np.diag((idx < 12).astype(float))
        solution = np.linalg.solve(system, a[:, idx].T @ dense_x_y[:, o])
        expected[idx[idx < 12], o] = solution[: (idx < 12).sum()] / scale
    got = refit.T if op == "gemm-transB" else refit
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    (dense_y,), (pruned_y,), (refit_y,) = (run_ort(m, {"x": held}) for m in (model, pruned, result.model))
    assert rel(refit_y, dense_y) < rel(pruned_y, dense_y)


def test_residual_branch_targets_the_add_minus_the_current_shortcut(rng):
    model = residual_model(rng)
    layers, _ = linear_layers(model)
    by_name = {layer.name: layer for layer in layers}
    c2 = by_name["c2"]
    assert c2.residual == "add" and c2.shortcut == "r0" and c2.bias is None
    assert by_name["c1"].residual is None and by_name["fc"].residual is None
    # the per-channel map from c2's output to the Add is the BatchNormalization's
    bn = initializer_arrays(model, ["bn.scale", "bn.shift", "bn.mean", "bn.var"])
    a = bn["bn.scale"] / np.sqrt(bn["bn.var"] + 1e-5)
    np.testing.assert_allclose(c2.scale, a, rtol=1e-6)
    np.testing.assert_allclose(c2.shift, bn["bn.shift"] - bn["bn.mean"] * a, rtol=1e-6, atol=1e-7)
    # c2 is refit after c0 and c1, at the Add: its shortcut (c0's output) is already refit
    assert [layer.name for layer in layers] == ["c0", "c1", "c2", "fc"]
    # Prune c0 (the shortcut's source, 90%: a shortcut error well above the fits' noise) and c2;
    # the refit Add output follows the dense one closer than c2 refit against its own dense output
    # would allow: the branch absorbs the shortcut's error.
    x, held = np.split(correlated(rng, 192, 4, 8), [128])
    weights = initializer_arrays(model, ["c0.w", "c2.w"])
    remove = {"c0.w": weights["c0.w"].size * 9 // 10, "c2.w": weights["c2.w"].size // 2}
    result = rc.reconstruct(model, model, data_for(model, x), 32, remove=remove, masked=list(remove))
    dense_add = reference_activations(model, ["add"], {"x": held})["add"]
    aware = reference_activations(result.model, ["add"], {"x": held})["add"]
    plain_layers = [
        LinearLayer(**{**vars(c2), "residual": None, "shortcut": None, "scale": None, "shift": None})
    ]
    unaware = refit_with(model, result.model, plain_layers[0], x)
    plain = reference_activations(unaware, ["add"], {"x": held})["add"]
    assert rel(aware, dense_add) < rel(plain, dense_add)


def refit_with(dense, current, layer, x) -> onnx.ModelProto:
    """Refit one layer of ``current`` with the given (possibly not residual-aware) description."""
    stubbed, values = split_weights(current, always=[layer.weight, *([layer.bias] if layer.bias else [])])
    batches = [{"x": x[i : i + 32]} for i in range(0, len(x), 32)]
    now = Activations(stubbed, values, batches, 2**30)
    then = Activations(*split_weights(dense), batches, 2**30)
    rng = np.random.default_rng(0)
    _, updates = rc.refit_layer(
        layer,
        values[layer.weight],
        values,
        lambda width: normal.normal_equations(layer, width, now, then, [], rng),
        remove=0,
        full_support=False,
    )
    return replace_initializers(current, updates)


def test_masks_stay_zero_over_a_whole_sample_and_obs_selection(rng):
    model = load_model(SAMPLES / "digits_resnet.onnx")
    calib = open_calibration(SAMPLES / "digits_calib.npz", model)
    names = ["block1.conv1.weight", "block2.conv2.weight", "fc1.weight"]
    weights = initializer_arrays(model, names)
    remove = {n: weights[n].size * 7 // 10 for n in names}
    test = load_npz(SAMPLES / "digits_test.npz")
    (dense_y,) = run_ort(model, {"input": test["input"]})
    errors = {}
    for select in ("magnitude", "obs"):
        result = rc.reconstruct(model, model, calib, 64, remove=remove, masked=names, select=select)
        after = initializer_arrays(result.model, names)
        for n in names:
            assert np.count_nonzero(after[n]) == weights[n].size - remove[n], (select, n)
        # every layer from the first pruned one on was refit; fc2 (never pruned) on full support
        refit = {f.name for f in result.fits if f.status == "refit"}
        assert {"block1.conv1", "block3.conv2", "fc1", "fc2"} <= refit and "stem.conv" not in refit
        assert all(f.error_after <= f.error_before + 1e-9 for f in result.fits if f.name in ("fc1",))
        (y,) = run_ort(result.model, {"input": test["input"]})
        errors[select] = rel(y, dense_y)
        assert (y.argmax(1) == dense_y.argmax(1)).mean() >= 0.97
    pruned = replace_initializers(
        model, {n: prune_smallest(weights[n], remove[n], np.random.default_rng(1)) for n in names}
    )
    (pruned_y,) = run_ort(pruned, {"input": test["input"]})
    assert max(errors.values()) < 0.5 * rel(pruned_y, dense_y)


@pytest.mark.parametrize("select", ["magnitude", "obs"])
def test_the_refit_is_the_same_on_one_core_and_on_two(monkeypatch, select):
    # Products, solves and both models' segments run in parts on threads; the parts are fixed, so
    # the weights are bitwise the same whether the parts run one after the other or at once.
    from egp_onnx.runtime import threads

    model = load_model(SAMPLES / "digits_resnet.onnx")
    calib = open_calibration(SAMPLES / "digits_calib.npz", model)
    names = ["block1.conv1.weight", "block2.conv2.weight", "fc1.weight"]
    weights = initializer_arrays(model, names)
    remove = {n: weights[n].size // 2 for n in names}
    monkeypatch.setattr(normal, "MIN_PART_ROWS", 64)  # every chunk split, small as these layers are
    results = {}
    for cores in (1, 2):
        monkeypatch.setattr(threads, "cores", lambda cores=cores: cores)
        result = rc.reconstruct(model, model, calib, 64, remove=remove, masked=names, select=select)
        results[cores] = {t.name: t.raw_data for t in result.model.graph.initializer}
    assert results[1] == results[2]
    assert results[1] != {t.name: t.raw_data for t in model.graph.initializer}  # the weights were refit


def test_batches_gathered_in_groups_give_the_rows_of_one_batch_at_a_time(monkeypatch):
    # Consecutive batches are joined before their im2col rows are gathered; the positions are
    # drawn batch by batch either way, so the fit is the same up to the sums' rounding.
    model = load_model(SAMPLES / "digits_resnet.onnx")
    calib = open_calibration(SAMPLES / "digits_calib.npz", model)
    names = ["block1.conv1.weight", "block2.conv2.weight", "fc1.weight"]
    weights = initializer_arrays(model, names)
    remove = {n: weights[n].size // 2 for n in names}
    fits = {}
    for group_bytes in (1, 2**30):
        monkeypatch.setattr(normal, "GROUP_BYTES", group_bytes)
        result = rc.reconstruct(model, model, calib, 16, remove=remove, masked=names)
        fits[group_bytes] = (initializer_arrays(result.model, names), result.fits)
    (alone, alone_fits), (grouped, grouped_fits) = fits[1], fits[2**30]
    for n in names:
        np.testing.assert_array_equal(alone[n] == 0, grouped[n] == 0)
        np.testing.assert_allclose(grouped[n], alone[n], rtol=1e-3, atol=1e-5)
    assert [f.rows for f in alone_fits] == [f.rows for f in grouped_fits]


def test_limits_keep_heads_dense_and_cap_layers_every_path_needs(rng):
    model = residual_model(rng)
    limits = sparsity_limits(model, ["c0.w", "c1.w", "c2.w", "fc.w"], 0.98)
    # c0 and fc are on every path (fc is also the head); c1/c2 form a branch the shortcut bypasses
    assert limits == {"c0.w": 0.98, "c1.w": 1.0, "c2.w": 1.0, "fc.w": 0.0}
    """
    SqueezeNet-style head: x -> Conv "c" -> Relu -> Conv "head" -> Relu -> GAP -> y
    """
    b = Builder(rng)
    h = b.op("Relu", [b.conv("x", "c", 3, 4, 3, pad=1)], "r")
    out = b.op("GlobalAveragePool", [b.op("Relu", [b.conv(h, "head", 4, 5, 1)], "r2")], "gap")
    squeeze = b.model(out, ("N", 3, 6, 6))
    assert sparsity_limits(squeeze, ["c.w", "head.w"], 0.9) == {"c.w": 0.9, "head.w": 0.0}
