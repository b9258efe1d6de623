"""The command line: the sample run, the JSON outputs, and every bad input refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, load_npz
from models import image_model as image_model_builder
from models import inputs, no_rectifier, save, save_external, toy_files, two_convs
from references import run_ort

from egp_onnx.cli.main import main

MODEL = SAMPLES / "digits_resnet.onnx"
CALIB = SAMPLES / "digits_calib.npz"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compress_sample(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, onnx.ModelProto, dict]:
    out, report = tmp_path / "x.onnx", tmp_path / "r.json"
    # a fixed target: without the guard, the run prunes (and refits) to exactly 90%
    args = ["compress", str(MODEL), "--calib", str(CALIB), "-o", str(out), "--sparsity", "0.9", "--no-guard"]
    proc = subprocess.run(
        [sys.executable, "-m", "egp_onnx", *args, "--report", str(report), *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, onnx.load(str(out)), json.loads(report.read_text())


def test_compress_sample_to_ninety_percent(tmp_path):
    before = digest(MODEL)
    proc, model, data = compress_sample(tmp_path)
    assert digest(MODEL) == before, "input model untouched"
    onnx.checker.check_model(model, full_check=True)
    x = load_npz(SAMPLES / "digits_test.npz")["input"]
    logits = run_ort(model, {"input": x})[0]
    assert logits.shape == (len(x), 10) and np.isfinite(logits).all()
    summary = data["model"]
    assert summary["prunable_zeroed"] == round(0.9 * summary["prunable_weights"])
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-4)
    for layer in data["layers"]:
        assert set(layer) >= {"name", "op_type", "rectifier", "entropy", "weights", "nonzero", "state"}
    assert data["surgery"]["enabled"] and not data["surgery"]["reverted"]
    assert summary["depth_after"] <= summary["depth_before"]
    assert "sparsity    0.900" in proc.stdout and "depth       9 -> " in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= 100


def test_no_surgery_report_matches_written_weights(tmp_path):
    _, model, data = compress_sample(tmp_path, "--no-surgery")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    zeroed = sum(int((weights[f"{layer['name']}.weight"] == 0).sum()) for layer in data["layers"])
    assert zeroed == data["model"]["prunable_zeroed"]
    for layer in data["layers"]:
        assert int(np.count_nonzero(weights[f"{layer['name']}.weight"])) == layer["nonzero"]
    assert data["model"]["op_counts_after"] == data["model"]["op_counts_before"]
    assert not data["surgery"]["enabled"]


def test_analyze_json(runner, tmp_path):
    out = tmp_path / "a.json"
    result = runner.invoke(main, ["analyze", str(MODEL), "--calib", str(CALIB), "--json", str(out)])
    assert result.exit_code == 0, result.output
    layers = json.loads(out.read_text())["layers"]
    assert len(layers) == 8
    for layer in layers:
        assert set(layer) >= {
            "name",
            "op_type",
            "rectifier",
            "entropy",
            "channels",
            "always_on",
            "always_off",
        }
        assert 0 <= layer["entropy"] <= 1
    assert "block2.relu1" in result.output


def test_sparsity_zero_keeps_weights(runner, tmp_path, rng):
    model, calib = toy_files(tmp_path, rng)
    out = tmp_path / "o.onnx"
    result = runner.invoke(
        main, ["compress", model, "--calib", calib, "-o", str(out), "--sparsity", "0", "--no-surgery"]
    )
    assert result.exit_code == 0, result.output
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(model).graph.initializer}
    written = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for name, array in original.items():
        np.testing.assert_array_equal(written[name], array)


def bad_cases(tmp_path, rng):
    """(name, args) pairs, each of which must be refused."""
    model = save(two_convs(rng), tmp_path / "m.onnx")
    good = tmp_path / "good.npz"
    np.savez(good, x=inputs(rng))
    (tmp_path / "text.onnx").write_text("hello, I am not a model\n")
    (tmp_path / "trunc.onnx").write_bytes((tmp_path / "m.onnx").read_bytes()[:100])
    np.savez(tmp_path / "names.npz", image=inputs(rng))
    np.savez(tmp_path / "rank.npz", x=inputs(rng)[:, 0])
    np.savez(tmp_path / "shape.npz", x=inputs(rng, shape=(3, 5, 6)))
    np.savez(tmp_path / "dtype.npz", x=inputs(rng).astype(np.float64))
    nan = inputs(rng)
    nan[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=nan)
    np.savez(tmp_path / "empty.npz")
    (tmp_path / "exists.onnx").write_bytes(b"precious")
    save(no_rectifier(rng), tmp_path / "sig.onnx")
    inf = inputs(rng)
    inf[1, 2, 3, 4] = np.inf
    np.savez(tmp_path / "inf.npz", x=inf)
    broken = two_convs(rng)
    broken.graph.node[1].input[0] = "nowhere"
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "readme.txt").write_text("no pictures here")
    (tmp_path / "bad_image").mkdir()
    (tmp_path / "bad_image" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    image_model = save(image_model_builder(rng), tmp_path / "img.onnx")
    out = str(tmp_path / "out.onnx")
    c = ["--calib", str(good)]
    return [
        ("fails checker", ["compress", str(tmp_path / "broken.onnx"), *c, "-o", out], "fails onnx.checker"),
        ("inf", ["compress", model, "--calib", str(tmp_path / "inf.npz"), "-o", out], "NaN or Inf"),
        (
            "no images",
            ["compress", image_model, "--calib", str(tmp_path / "no_images"), "-o", out],
            "no .npz, .npy or image",
        ),
        (
            "bad image",
            ["compress", image_model, "--calib", str(tmp_path / "bad_image"), "-o", out],
            "cannot read image",
        ),
        ("missing calib", ["compress", model, "--calib", str(tmp_path / "nope.npz"), "-o", out], "not found"),
        ("batch size", ["compress", model, *c, "-o", out, "--batch-size", "0"], "--batch-size"),
        ("holdout", ["compress", model, *c, "-o", out, "--holdout", "1.5"], "--holdout"),
        ("unseen, no eval", ["compress", model, *c, "-o", out, "--eval-unseen"], "give --eval with it"),
        (
            "eval and holdout",
            ["compress", model, *c, "-o", out, "--holdout", "0.5", "--eval", str(good)],
            "not both",
        ),
        ("shape", ["compress", model, "--calib", str(tmp_path / "shape.npz"), "-o", out], "has shape"),
        ("missing model", ["compress", str(tmp_path / "nope.onnx"), *c, "-o", out], "not found"),
        ("not onnx", ["compress", str(tmp_path / "text.onnx"), *c, "-o", out], "not an ONNX model"),
        ("truncated", ["compress", str(tmp_path / "trunc.onnx"), *c, "-o", out], "not an ONNX model"),
        (
            "names",
            ["compress", model, "--calib", str(tmp_path / "names.npz"), "-o", out],
            "no data for model input",
        ),
        ("rank", ["compress", model, "--calib", str(tmp_path / "rank.npz"), "-o", out], "rank"),
        ("dtype", ["compress", model, "--calib", str(tmp_path / "dtype.npz"), "-o", out], "dtype float64"),
        ("nan", ["compress", model, "--calib", str(tmp_path / "nan.npz"), "-o", out], "NaN"),
        ("empty", ["compress", model, "--calib", str(tmp_path / "empty.npz"), "-o", out], "empty"),
        ("sparsity 1", ["compress", model, *c, "-o", out, "--sparsity", "1"], "--sparsity"),
        ("sparsity <0", ["compress", model, *c, "-o", out, "--sparsity", "-0.1"], "--sparsity"),
        ("step 0", ["compress", model, *c, "-o", out, "--step", "0"], "--step"),
        ("exists", ["compress", model, *c, "-o", str(tmp_path / "exists.onnx")], "--force"),
        ("output is input", ["compress", model, *c, "-o", model, "--force"], "is the input"),
        ("nothing to prune", ["compress", str(tmp_path / "sig.onnx"), *c, "-o", out], "nothing to prune"),
        ("no folder", ["compress", model, *c, "-o", str(tmp_path / "no" / "o.onnx")], "does not exist"),
        ("analyze missing", ["analyze", str(tmp_path / "nope.onnx"), *c], "not found"),
        ("seed <0", ["compress", model, *c, "-o", out, "--seed", "-5"], "--seed must be at least 0, got -5"),
        (
            "merge tolerance nan",
            ["compress", model, *c, "-o", out, "--merge-tolerance", "nan"],
            "--merge-tolerance must be a finite number >= 0, got nan",
        ),
        (
            "max rel error inf",
            ["compress", model, *c, "-o", out, "--max-rel-error", "inf"],
            "--max-rel-error must be a finite number >= 0, got inf",
        ),
        (
            "lr nan",
            ["compress", model, *c, "-o", out, "--lr", "nan"],
            "--lr must be a finite number > 0, got nan",
        ),
        ("workers <0", ["compress", model, *c, "-o", out, "--workers", "-1"], "--workers must be at least 0"),
        ("mean nan", ["compress", model, *c, "-o", out, "--mean", "nan"], "take finite numbers, got 'nan'"),
        (
            "not a number",
            ["compress", model, *c, "-o", out, "--sparsity", "abc"],
            "Invalid value for '--sparsity': 'abc' is not a valid float. (see main compress --help)",
        ),
        ("missing option", ["compress", model, *c], "Missing option '-o' / '--output'."),
        (
            "json is the calibration data",
            ["analyze", model, *c, "--json", str(good), "--force"],
            "good.npz is the input file of --calib; choose another output path",
        ),
        (
            "plot suffix",
            ["compress", model, *c, "-o", out, "--plot", str(tmp_path / "p.xyz")],
            "p.xyz: cannot draw a .xyz file; end the name in one of .png, .pdf, .svg",
        ),
        (
            "verify atol",
            ["verify", model, model, "--data", str(good), "--atol", "-1"],
            "--atol must be a finite",
        ),
        ("verify rtol", ["verify", model, model, "--data", str(good), "--rtol", "nan"], "got nan"),
    ]


def test_bad_inputs_refused_in_one_line(runner, tmp_path, rng):
    cases = bad_cases(tmp_path, rng)
    before = {p: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    for name, args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (name, result.output, result.exception)
        assert isinstance(result.exception, SystemExit), (name, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(("egp-onnx: error:", "egp-onnx: nothing to prune:")), (
            name,
            result.stderr,
        )
        assert message in lines[0], (name, lines[0])
        assert "Traceback" not in result.output
    after = {p: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    assert after == before, "no file written or changed"


def test_force_overwrites(runner, tmp_path, rng):
    model, calib = toy_files(tmp_path, rng)
    out = tmp_path / "o.onnx"
    out.write_bytes(b"old")
    result = runner.invoke(
        main, ["compress", model, "--calib", calib, "-o", str(out), "--sparsity", "0.5", "--force"]
    )
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(str(out)))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "outputs are not private temp-file modes"


def test_help_lists_commands(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "analyze" in result.output and "compress" in result.output


def test_external_data_in_and_out(runner, tmp_path, rng):
    model = two_convs(rng)
    save_external(model, tmp_path / "ext.onnx", "ext.weights")
    assert (tmp_path / "ext.weights").exists()
    x = inputs(rng)
    np.savez(tmp_path / "c.npz", x=x)
    out = tmp_path / "o.onnx"
    args = [
        "compress",
        str(tmp_path / "ext.onnx"),
        "--calib",
        str(tmp_path / "c.npz"),
        "-o",
        str(out),
        "--sparsity",
        "0",
    ]
    result = runner.invoke(main, [*args, "--external-data"])
    assert result.exit_code == 0, result.output
    data_file = tmp_path / "o.onnx.data"
    assert data_file.exists() and data_file.stat().st_size >= 4 * 3 * 3 * 3 * 4
    assert out.stat().st_size < data_file.stat().st_size, "the weights live beside the graph"
    want = run_ort(model, {"x": x})[0]
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], want, rtol=1e-5, atol=1e-6)
    again = runner.invoke(main, [*args, "--external-data"])
    assert again.exit_code == 2, "an existing output is not overwritten without --force"
    forced = runner.invoke(main, [*args, "--external-data", "--force"])
    assert forced.exit_code == 0, forced.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no staging left behind"


def test_same_inputs_give_byte_identical_outputs(runner, tmp_path):
    outputs = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        args = [
            "compress",
            str(MODEL),
            "--calib",
            str(CALIB),
            "-o",
            str(folder / "m.onnx"),
            "--sparsity",
            "0.7",
            "--step",
            "0.7",
            "--holdout",
            "0.2",
            "--seed",
            "5",
            "--report",
            str(folder / "r.json"),
        ]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        report = json.loads((folder / "r.json").read_text())
        assert report["timing"] is not None
        report.pop("timing")  # machine-dependent latency: the only part excluded from the comparison
        outputs.append(((folder / "m.onnx").read_bytes(), report))
        no_latency = runner.invoke(main, [*args, "--no-latency", "--force"])
        assert no_latency.exit_code == 0
        outputs.append(((folder / "m.onnx").read_bytes(), (folder / "r.json").read_bytes()))
    assert outputs[0] == outputs[2], "model bytes and report (less timing) identical"
    assert outputs[1] == outputs[3], "with --no-latency the report files are byte-identical"
    assert outputs[0][0] == outputs[1][0]


def test_unwritable_output_folder_is_refused(runner, tmp_path, rng, monkeypatch):
    """Root may write anywhere, so the folder's permission answer is simulated."""
    model, calib = toy_files(tmp_path, rng)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    result = runner.invoke(main, ["compress", model, "--calib", calib, "-o", str(locked / "o.onnx")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"egp-onnx: error: output folder {locked} is not writable"
    assert list(locked.iterdir()) == []


def test_stats_shards_merge_to_the_whole(runner, tmp_path):
    data = load_npz(CALIB)
    np.savez(tmp_path / "a.npz", input=data["input"][:200])
    np.savez(tmp_path / "b.npz", input=data["input"][200:])
    for part in ("a", "b"):
        result = runner.invoke(
            main,
            [
                "stats",
                str(MODEL),
                "--calib",
                str(tmp_path / f"{part}.npz"),
                "-o",
                str(tmp_path / f"{part}.stats.npz"),
            ],
        )
        assert result.exit_code == 0, result.output
    merged = runner.invoke(
        main,
        [
            "analyze",
            str(MODEL),
            "--stats",
            str(tmp_path / "a.stats.npz"),
            "--stats",
            str(tmp_path / "b.stats.npz"),
            "--json",
            str(tmp_path / "merged.json"),
        ],
    )
    whole = runner.invoke(
        main, ["analyze", str(MODEL), "--calib", str(CALIB), "--json", str(tmp_path / "whole.json")]
    )
    assert merged.exit_code == 0 and whole.exit_code == 0, merged.output + whole.output
    merged_report = json.loads((tmp_path / "merged.json").read_text())
    whole_report = json.loads((tmp_path / "whole.json").read_text())
    merged_report.pop("source"), whole_report.pop("source")
    assert merged_report == whole_report and merged_report["samples"] == 512
    # compress can start from the saved statistics of the original model
    # --holdout 0: the counted run calibrates on the same samples the statistics files counted
    args = ["compress", str(MODEL), "--calib", str(CALIB), "--sparsity", "0.5", "--no-latency"]
    args += ["--holdout", "0", "--report"]
    from_stats = runner.invoke(
        main,
        [
            *args,
            str(tmp_path / "r1.json"),
            "-o",
            str(tmp_path / "m1.onnx"),
            "--stats",
            str(tmp_path / "a.stats.npz"),
            "--stats",
            str(tmp_path / "b.stats.npz"),
        ],
    )
    counted = runner.invoke(main, [*args, str(tmp_path / "r2.json"), "-o", str(tmp_path / "m2.onnx")])
    assert from_stats.exit_code == 0 and counted.exit_code == 0, from_stats.output + counted.output
    assert (tmp_path / "m1.onnx").read_bytes() == (tmp_path / "m2.onnx").read_bytes()


def test_stats_of_another_model_are_refused(runner, tmp_path, rng):
    model, calib = toy_files(tmp_path, rng)
    result = runner.invoke(main, ["stats", model, "--calib", calib, "-o", str(tmp_path / "s.npz")])
    assert result.exit_code == 0, result.output
    other = runner.invoke(main, ["analyze", str(MODEL), "--stats", str(tmp_path / "s.npz")])
    assert other.exit_code == 2 and "another model" in other.stderr
    neither = runner.invoke(main, ["analyze", str(MODEL)])
    assert neither.exit_code == 2 and "--calib" in neither.stderr
