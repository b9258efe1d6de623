"""The fidelity guard, held-out evaluation, cost figures, the report schema and `verify`."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import ROOT, SAMPLES, compress_plain, load_npz
from models import inputs, residual_block, single_conv, toy_files
from onnx import TensorProto, helper, numpy_helper
from references import run_ort

import egp_onnx
from egp_onnx.cli.main import main
from egp_onnx.graph.structure import depth
from egp_onnx.graph.weights import count_parameters, initializer_counts, split_weights
from egp_onnx.load.calibration import open_calibration, split_holdout
from egp_onnx.load.model import load_model, prepare_model
from egp_onnx.prune.loop import RETRIES
from egp_onnx.runtime.handle import ModelHandle, StoredOutputs
from egp_onnx.verify.cost import count_macs, model_cost
from egp_onnx.verify.fidelity import Reference, compare

MODEL = SAMPLES / "digits_resnet.onnx"
CALIB = SAMPLES / "digits_calib.npz"
TEST = SAMPLES / "digits_test.npz"
SCHEMA = json.loads((ROOT / "docs" / "compress-report.schema.json").read_text())


def sample_args(tmp_path: Path, *extra: str) -> list[str]:
    """`compress` on the sample at sparsity 0.5, writing tmp_path/x.onnx."""
    return [
        "compress",
        str(MODEL),
        "--calib",
        str(CALIB),
        "-o",
        str(tmp_path / "x.onnx"),
        "--sparsity",
        "0.5",
        *extra,
    ]


def predictions(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    return run_ort(model, {"input": x})[0].argmax(1)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_guarded_sample_agreement_matches_independent_measurement(tmp_path):
    out, report_path = tmp_path / "x.onnx", tmp_path / "r.json"
    args = [
        "compress",
        str(MODEL),
        "--calib",
        str(CALIB),
        "-o",
        str(out),
        "--sparsity",
        "0.9",
        "--eval",
        str(TEST),
        "--min-agreement",
        "0.97",
        "--no-reconstruct",  # plain EGP: the guard stops it within a few steps
        "--report",
        str(report_path),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    test = load_npz(TEST)
    independent = float((predictions(out, test["input"]) == predictions(MODEL, test["input"])).mean())
    assert report["fidelity"]["top1_agreement"] == pytest.approx(independent, abs=0.003)
    assert report["fidelity"]["top1_agreement"] >= 0.97
    assert report["fidelity"]["data"] == "eval" and report["fidelity"]["samples"] == len(test["input"])
    accuracy = float((predictions(out, test["input"]) == test["labels"]).mean())
    assert report["fidelity"]["accuracy_after"] == pytest.approx(accuracy, abs=1e-8)
    assert report["stop"]["reason"] == "guard"
    assert report["steps"][-1]["accepted"] is False and report["steps"][-1]["top1_agreement"] < 0.97
    jsonschema.validate(report, SCHEMA)


@pytest.mark.parametrize(
    "extra", [[], ["--no-latency", "--no-surgery"], ["--holdout", "0.25", "--max-rel-error", "0.9"]]
)
def test_reports_validate_against_documented_schema(extra, tmp_path):
    report_path = tmp_path / "r.json"
    result = CliRunner().invoke(main, sample_args(tmp_path, "--report", str(report_path), *extra))
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["schema_version"] == 2


def test_schema_rejects_drift(tmp_path):
    """The schema is strict: a renamed field would not pass."""
    report = compress_plain(MODEL, CALIB, sparsity=0.3, latency=False).report.to_dict()
    jsonschema.validate(report, SCHEMA)
    report["model"]["depth"] = report["model"].pop("depth_after")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, SCHEMA)


def test_guard_stops_at_the_right_step(rng, tmp_path):
    model = residual_block(rng)
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=24, shape=(4, 6, 6)))
    calib = tmp_path / "c.npz"
    free = compress_plain(model, calib, sparsity=0.95, step=0.3, surgery=False, latency=False).report
    errors = [s.rel_error for s in free.steps]
    assert len(errors) >= 4 and errors[:4] == sorted(errors[:4]), "damage grows step by step"
    threshold = (errors[1] + errors[2]) / 2  # step 2 passes, step 3 does not
    guarded = compress_plain(
        model, calib, sparsity=0.95, step=0.3, surgery=False, latency=False, max_rel_error=threshold
    )
    report = guarded.report
    steps = report.steps
    assert report.stop.reason == "guard"
    # steps 1 and 2 are the free run's; step 3 at full size breaks the guard and is rolled back
    assert [(s.removed, s.accepted) for s in steps[:3]] == [
        (free.steps[0].removed, True),
        (free.steps[1].removed, True),
        (free.steps[2].removed, False),
    ]
    # a rejected step is retried at half its size; the run stops after RETRIES rejections in a row
    for rejected, retry in zip(steps[:-1], steps[1:], strict=True):
        if not rejected.accepted:
            assert retry.removed <= rejected.removed / 2 + 1
    assert [s.accepted for s in steps[-(RETRIES + 1) :]] == [False] * (RETRIES + 1)
    accepted = [s for s in steps if s.accepted]
    assert all(s.rel_error <= threshold for s in accepted)
    assert all(s.rel_error > threshold for s in steps if not s.accepted)
    # the written model is the last accepted step's
    assert report.stop.step == accepted[-1].step
    assert report.model.sparsity == pytest.approx(accepted[-1].sparsity)
    assert report.fidelity.rel_error == pytest.approx(accepted[-1].rel_error, rel=1e-6)


def test_first_step_failing_the_guard_exits_1_and_writes_nothing(rng, tmp_path):
    model, calib = toy_files(tmp_path, rng)
    out = tmp_path / "o.onnx"
    args = [
        "compress",
        model,
        "--calib",
        calib,
        "-o",
        str(out),
        "--max-rel-error",
        "0",
        "--report",
        str(tmp_path / "r.json"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "step 1" in result.stderr and "failed the guard" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "r.json").exists()


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


def test_mac_count_matches_hand_computation(rng):
    """
    x(N,3,6,6) -> Conv3x3(3->4, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(4->5) -> y
    """
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w[0] = 0  # 27 zero weights
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(rng.normal(size=(5, 4)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(5, np.float32), "fb"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    dense, sparse = count_macs(model, {"x": (1, 3, 6, 6)})
    conv = 4 * 3 * 3 * 3 * 6 * 6  # every output position: C_out x C_in x k x k
    gemm = 4 * 5
    assert dense == conv + gemm == 3908
    assert sparse == (4 - 1) * 3 * 3 * 3 * 6 * 6 + gemm
    cost = model_cost(model, {"x": (1, 3, 6, 6)})  # reads each weight once for both figures
    assert (cost.macs, cost.nonzero_macs) == (dense, sparse)
    assert (cost.params, cost.nonzero_params) == count_parameters(model) == (4 * 27 + 20 + 5, 3 * 27 + 20)
    assert cost.file_bytes == model.ByteSize()


def test_holdout_split_is_disjoint_and_seeded(rng, tmp_path):
    model = prepare_model(single_conv(rng))
    x = inputs(rng, n=20)
    np.savez(tmp_path / "c.npz", x=x, labels=np.arange(20))
    data = open_calibration(tmp_path / "c.npz", model)
    calib, held = split_holdout(data, 0.25, seed=3)
    (xc, lc), (xh, lh) = calib.arrays(), held.arrays()
    np.testing.assert_array_equal(xc["x"], x[lc])
    assert len(lh) == 5 and len(lc) == 15
    assert sorted([*lc.tolist(), *lh.tolist()]) == list(range(20))
    np.testing.assert_array_equal(xh["x"], x[lh])
    again = split_holdout(data, 0.25, seed=3)[1].arrays()[1]
    np.testing.assert_array_equal(again, lh)


def test_quiet_prints_nothing(tmp_path, rng):
    model, calib = toy_files(tmp_path, rng)
    args = ["compress", model, "--calib", calib, "-o", str(tmp_path / "o.onnx"), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and result.output == ""
    assert (tmp_path / "o.onnx").exists()


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the optional matplotlib extra")
    plot = tmp_path / "run.png"
    result = CliRunner().invoke(
        main, sample_args(tmp_path, "--eval", str(TEST), "--plot", str(plot), "--no-latency")
    )
    assert result.exit_code == 0, result.output
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert str(plot) in result.output


def test_a_model_handle_builds_its_session_once_and_measures_the_same(rng, tmp_path):
    model = prepare_model(single_conv(rng))
    other = prepare_model(single_conv(np.random.default_rng(5)))
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=12))
    data = open_calibration(tmp_path / "c.npz", model)
    prepared = ModelHandle(other)
    session = prepared.session
    reference = Reference(model, data, 5)
    assert compare(model, prepared, data, 5) == compare(model, other, data, 5)
    assert reference.evaluate(prepared) == reference.evaluate(other)
    assert reference.evaluate(prepared).rel_error > 0
    assert prepared.session is session


def test_a_model_handle_with_known_or_split_weights_measures_and_counts_the_same(rng, tmp_path, monkeypatch):
    import egp_onnx.graph.weights as topology

    model = prepare_model(single_conv(rng))
    other = prepare_model(single_conv(np.random.default_rng(5)))
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=12))
    data = open_calibration(tmp_path / "c.npz", model)
    stubbed, weights = split_weights(other)
    plain, counts = compare(model, other, data, 5), initializer_counts(other)
    reference = ModelHandle(model)
    assert reference.session is not None  # built before to_array is watched
    read = []
    real = topology.numpy_helper.to_array
    monkeypatch.setattr(topology.numpy_helper, "to_array", lambda t, *a: read.append(t.name) or real(t, *a))
    for prepared in (ModelHandle(other, known=weights), ModelHandle(other, split=(stubbed, weights))):
        assert prepared.counts == {}
        assert compare(reference, prepared, data, 5) == plain
        assert prepared.counts == counts
    assert weights and not set(read) & set(weights), "the given arrays are not read again"
    assert plain.rel_error > 0 and counts["w"][1:] == (4 * 27, 4 * 27)


@pytest.mark.parametrize("latency", [True, False])
def test_the_report_counts_both_models_as_an_independent_count_does(latency, rng, tmp_path):
    """The original's figures are taken before the loop (its weights go after it), the result's
    from its session's counts."""
    model, calib = toy_files(tmp_path, rng)
    options = {"sparsity": 0.5, "step": 1.0, "guard": False, "batch_size": 8, "latency": latency}
    result = egp_onnx.compress(model, calib, **options)
    original, shapes = load_model(model), {"x": (1, 3, 6, 6)}
    assert result.report.cost.before == model_cost(original, shapes)
    assert result.report.cost.after == model_cost(result.model, shapes)
    assert result.report.cost.after.nonzero_params < result.report.cost.before.nonzero_params
    summary = result.report.model
    assert (summary.depth_before, summary.nodes_before) == (depth(original).layers, len(original.graph.node))


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


def test_stored_outputs_compare_as_the_model_does_and_its_session_goes(rng, tmp_path, monkeypatch):
    import egp_onnx.runtime.handle as handle

    model = prepare_model(single_conv(rng))
    other = prepare_model(single_conv(np.random.default_rng(5)))
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=12))
    data = open_calibration(tmp_path / "c.npz", model)
    plain = compare(model, other, data, 5, 1e-3, 1e-3)
    outputs = 12 * 4 * 6 * 6 * 4  # bytes: 12 samples of (4, 6, 6) float32
    monkeypatch.setattr(handle, "serialized_size", lambda m: outputs)  # weights as large as the outputs
    prepared = ModelHandle(model)
    session = prepared.session
    stored = StoredOutputs.instead_of(prepared, data, 5)
    assert isinstance(stored, StoredOutputs) and [len(b) for b in stored.batches] == [1, 1, 1]
    assert compare(stored, other, data, 5, 1e-3, 1e-3) == plain and plain.rel_error > 0
    assert prepared.warm == set() and prepared.session is not session, "let go, built again when run"
    assert compare(prepared, other, data, 5, 1e-3, 1e-3) == plain
    # outputs that would take more memory than the weights: the model keeps its session
    monkeypatch.setattr(handle, "serialized_size", lambda m: outputs - 1)
    session = prepared.session
    assert StoredOutputs.instead_of(prepared, data, 5) is prepared and prepared.session is session


def test_a_model_handle_remembers_the_shapes_it_has_run(rng, tmp_path):
    model = prepare_model(single_conv(rng))
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=12))
    data = open_calibration(tmp_path / "c.npz", model)
    prepared = ModelHandle(model)
    Reference(prepared, data, 5)  # batches of 5, 5 and 2
    assert prepared.warm == {(("x", (5, 3, 6, 6)),), (("x", (2, 3, 6, 6)),)}


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
