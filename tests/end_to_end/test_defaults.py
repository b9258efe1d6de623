"""Fidelity-first defaults: the guard is on, the held-out split automatic, sparsity 0 exact."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from cli_checks import cli, compress_args
from click.testing import CliRunner
from conftest import REPORT_SCHEMA, SAMPLES, load_npz
from models import Builder, f32, toy_files
from references import run_ort

import egp_onnx
from egp_onnx.cli.main import main
from egp_onnx.load.calibration import automatic_holdout, open_calibration, split_holdout
from egp_onnx.load.model import load_model

TEST = SAMPLES / "digits_test.npz"

MODEL = SAMPLES / "digits_resnet.onnx"
CALIB = SAMPLES / "digits_calib.npz"


@pytest.mark.parametrize(("samples", "held"), [(1, 0), (3, 0), (8, 4), (512, 256), (2000, 500), (4000, 1000)])
def test_automatic_holdout_size(samples, held):
    assert automatic_holdout(samples) == held


def test_default_run_writes_a_model_within_the_guard(tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    # the default command, with a lower ceiling to keep the test short
    proc = cli(
        *compress_args(MODEL, CALIB, out, "--report", str(report), "--sparsity", "0.6", "--no-latency")
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    settings = data["settings"]
    assert settings["guard"] and settings["reconstruct"] and settings["min_agreement"] == 0.99
    assert data["fidelity"]["data"] == "holdout" and data["fidelity"]["samples"] == 256
    assert "coarse: fewer than 500 samples" in proc.stdout
    assert all(step["reconstructed"] for step in data["steps"])
    # Re-measure on the same held-out split, independently of the tool's own figures.
    original = load_model(MODEL)
    _, held = split_holdout(open_calibration(CALIB, original), None, 0)
    arrays, _ = held.arrays()
    want = run_ort(original, arrays)[0]
    got = run_ort(onnx.load(out), arrays)[0]
    agreement = float((want.argmax(1) == got.argmax(1)).mean())
    assert agreement >= 0.99
    assert agreement == pytest.approx(data["fidelity"]["top1_agreement"])
    assert data["model"]["sparsity"] > 0.3


def classifier(rng) -> onnx.ModelProto:
    """
    x(N,16) -> Gemm(16->32) "fc1" -> Relu -> Gemm(32->10) "fc2" -> y
    """
    b = Builder(rng)
    h = b.op("Relu", [b.gemm("x", "fc1", 16, 32)], "relu")
    return b.model(b.gemm(h, "fc2", 32, 10), ("N", 16))


def test_the_guard_refuses_to_write_a_broken_model(rng, tmp_path):
    # No pruning step of this random classifier, down to the step search's smallest, keeps its
    # logits within a relative error of 1e-9 (the search finds steps that keep every answer).
    onnx.save(classifier(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=f32(rng.normal(size=(2000, 16))))
    out = tmp_path / "out.onnx"
    strict = ("--max-rel-error", "1e-9", "--no-latency")
    proc = cli(*compress_args(tmp_path / "m.onnx", tmp_path / "c.npz", out, *strict))
    assert proc.returncode == 1, proc.stderr
    assert "failed the guard" in proc.stderr and "nothing written" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_sparsity_zero_is_exact_on_a_different_distribution(rng):
    model = load_model(MODEL)
    result = egp_onnx.compress(model, CALIB, sparsity=0.0, latency=False)
    kinds = {r.kind for r in result.report.surgery.rewrites if r.applied}
    assert kinds and kinds <= {"fold_bn", "fold_constant", "merge", "fold_residual"}, kinds
    assert result.report.model.prunable_zeroed == 0 and result.report.steps == ()
    # inputs the calibration data never looked like: uniform noise, scaled and shifted
    x = f32(rng.uniform(-3, 8, size=(64, 1, 8, 8)))
    want, got = run_ort(model, {"input": x})[0], run_ort(result.model, {"input": x})[0]
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    test = load_npz(SAMPLES / "digits_test.npz")
    np.testing.assert_allclose(
        run_ort(result.model, {"input": test["input"]})[0],
        run_ort(model, {"input": test["input"]})[0],
        rtol=1e-4,
        atol=1e-4,
    )


def test_an_unknown_option_is_refused_by_name_before_any_work(tmp_path):
    from egp_onnx.errors import ConfigError

    missing = tmp_path / "missing.onnx"  # never opened: the options are checked first
    with pytest.raises(ConfigError, match="unknown option 'sparsty'; the options are: .*sparsity"):
        egp_onnx.compress(missing, CALIB, sparsty=0.5)
    with pytest.raises(ConfigError, match="--step must be in"):
        egp_onnx.compress(missing, CALIB, step=0)


def test_settings_and_keyword_overrides_make_the_same_run(rng, tmp_path):
    from models import toy_files

    from egp_onnx.config import DataConfig, Settings

    model, calib = toy_files(tmp_path, rng)
    by_keywords = egp_onnx.compress(
        model, calib, sparsity=0.5, step=1.0, guard=False, latency=False, workers=1
    )
    settings = Settings(sparsity=0.9, step=1.0, latency=False)
    by_settings = egp_onnx.compress(
        model, calib, settings, sparsity=0.5, guard=False, data=DataConfig(workers=1)
    )
    assert by_settings.report.settings == by_keywords.report.settings
    assert by_settings.report.settings["sparsity"] == 0.5 and not by_settings.report.settings["guard"]
    assert by_settings.model.SerializeToString() == by_keywords.model.SerializeToString()
    assert settings == Settings(sparsity=0.9, step=1.0, latency=False), (
        "the caller's settings are not changed"
    )


def predictions(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    return run_ort(model, {"input": x})[0].argmax(1)


def test_guarded_sample_agreement_matches_independent_measurement(tmp_path):
    out, report_path = tmp_path / "x.onnx", tmp_path / "r.json"
    guarded = ["--sparsity", "0.9", "--eval", str(TEST), "--min-agreement", "0.97"]
    # plain EGP (--no-reconstruct): the guard stops it within a few steps
    args = compress_args(MODEL, CALIB, out, *guarded, "--no-reconstruct", "--report", str(report_path))
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
    # the step search ends between an accepted and a rejected sparsity; each rejection says why
    rejected = [s for s in report["steps"] if not s["accepted"]]
    assert rejected and all(s["problems"] for s in rejected)
    assert all(not s["problems"] for s in report["steps"] if s["accepted"])
    assert min(s["sparsity"] for s in rejected) > report["model"]["sparsity"]
    jsonschema.validate(report, REPORT_SCHEMA)


def test_first_step_failing_the_guard_exits_1_and_writes_nothing(rng, tmp_path):
    model, calib = toy_files(tmp_path, rng)
    out = tmp_path / "o.onnx"
    args = compress_args(model, calib, out, "--max-rel-error", "0", "--report", str(tmp_path / "r.json"))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "step 1" in result.stderr and "failed the guard" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "r.json").exists()
