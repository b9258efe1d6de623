"""Channel removal's least squares: the group-OBS price, and the consumer refit on held-out data."""

from __future__ import annotations

import numpy as np
import onnx
from models import Builder, f32
from references import run_ort

from egp_onnx.graph.channels import channel_groups
from egp_onnx.load.calibration import open_calibration
from egp_onnx.load.model import prepare_model
from egp_onnx.reconstruct.channels import refit_consumers, removal_costs
from egp_onnx.reconstruct.solve import block_costs, ridge
from egp_onnx.surgery.narrow import narrowed


def test_block_cost_is_the_residual_rise_of_the_refit_without_the_block(rng):
    a = np.concatenate([rng.normal(size=(200, 6)), np.ones((200, 1))], axis=1)
    a[:, 3] = a[:, 0] + 0.01 * rng.normal(size=200)  # column 3 is nearly column 0: cheap to drop
    y = a[:, :6] @ rng.normal(size=(6, 2)) + rng.normal(size=(200, 2)) * 0.1
    gram, cross = a.T @ a, a.T @ y
    lam = ridge(gram, True)
    reg = np.diag([lam] * 6 + [0.0])

    def rss(keep):
        g = (gram + reg)[np.ix_(keep, keep)]
        w = np.linalg.solve(g, cross[keep])
        full = np.zeros((7, 2))
        full[keep] = w
        return float(((a @ full - y) ** 2).sum() + (full * (reg @ full)).sum())

    blocks = [np.array([0]), np.array([3]), np.array([1, 2])]
    costs = block_costs(gram, cross, True, blocks)
    base = rss(list(range(7)))
    for block, cost in zip(blocks, costs, strict=True):
        np.testing.assert_allclose(cost, rss([k for k in range(7) if k not in block]) - base, rtol=1e-6)
    assert costs[1] < costs[2]


def test_the_refit_consumer_beats_the_unrefit_one_on_held_out_data(rng, tmp_path):
    """
    x -> Conv3x3 "a" (8) -> Relu "r" -> Conv3x3 "b" (4) -> y;  two of a's channels removed
    """
    b = Builder(rng)
    model = b.model(
        b.conv(b.op("Relu", [b.conv("x", "a", 3, 8, 3, pad=1)], "r"), "b", 8, 4, 3, pad=1), ["N", 3, 6, 6]
    )
    # correlated input channels, so the other channels can stand in for the removed ones
    base = rng.normal(size=(400, 1, 6, 6))
    x = f32(
        np.concatenate(
            [base, base * 0.8 + 0.3 * rng.normal(size=base.shape), rng.normal(size=base.shape)], axis=1
        )
    )
    np.savez(tmp_path / "fit.npz", x=x[:300])
    prepared = prepare_model(model)
    groups, _ = channel_groups(prepared)
    data = open_calibration(str(tmp_path / "fit.npz"), prepared)
    costs = removal_costs(prepared, prepared, data, 50, {"b": [np.array([c]) for c in range(8)]}, {})
    drop = np.sort(np.argsort(costs["b"])[:2])
    cut = narrowed(prepared, groups, {"a": drop})
    kept = {"a": np.delete(np.arange(8), drop)}
    refit, fits = refit_consumers(prepared, cut, data, 50, ["b"], kept)
    assert [f.name for f in fits] == ["b"] and fits[0].error_after < fits[0].error_before
    held = x[300:]
    (want,), (plain,), (fitted,) = (run_ort(m, {"x": held}) for m in (model, cut, refit))
    assert np.linalg.norm(fitted - want) < 0.8 * np.linalg.norm(plain - want)


def test_the_branch_constant_is_the_least_squares_one(rng, tmp_path):
    """
    x -> Conv "a" -> Relu "r" -+-> Conv "b" -> Add "add" -> Relu -> y
                               +-------------^
    With the model itself as the target, c is the mean of b's output over samples and positions.
    """
    from egp_onnx.graph.channels import residual_branches
    from egp_onnx.reconstruct.channels import branch_constant

    b = Builder(rng)
    r = b.op("Relu", [b.conv("x", "a", 3, 4, 3, pad=1)], "r")
    add = b.op("Add", [b.conv(r, "b", 4, 4, 3, pad=1), r], "add")
    model = prepare_model(b.model(b.op("Relu", [add], "out"), ["N", 3, 6, 6]))
    x = f32(rng.normal(size=(70, 3, 6, 6)))
    np.savez(tmp_path / "fit.npz", x=x)
    data = open_calibration(str(tmp_path / "fit.npz"), model)
    (branch,) = residual_branches(model)
    c = branch_constant(model, model, data, 32, branch)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, None))
    out = run_ort(probe, {"x": x})[-1]
    np.testing.assert_allclose(c, out.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
