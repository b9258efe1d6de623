"""Output planning and atomic writes (cli/files.py): an input is never overwritten, all outputs or none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_checks import digests, one_line_error
from conftest import ROOT
from models import inputs, save, save_external, toy_files, two_convs

import egp_onnx
from egp_onnx.cli.files import OutputWriter, input_path, model_inputs, plan_outputs
from egp_onnx.cli.main import main
from egp_onnx.errors import OutputError


def test_outputs_never_overwrite_inputs_even_with_force(runner, tmp_path, rng, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, calib = toy_files(tmp_path, rng)
    (tmp_path / "ft.py").write_text("def keep(model, masks):\n    return model\n")
    (tmp_path / "factory.py").write_text("def factory():\n    return None\n")
    np.savez(tmp_path / "e.npz", x=inputs(rng))
    (tmp_path / "folder").mkdir()
    np.savez(tmp_path / "folder" / "part.npz", x=inputs(rng))
    os.symlink(tmp_path / "c.npz", tmp_path / "soft.npz")
    os.link(tmp_path / "c.npz", tmp_path / "hard.npz")
    save_external(two_convs(rng), tmp_path / "ext.onnx", "w.bin")
    c = ["--calib", calib]
    cases = [
        (["analyze", model, *c, "--json", calib], "the input file of --calib"),
        (["stats", model, *c, "-o", str(tmp_path / "soft.npz")], "the input file of --calib"),
        (["stats", model, *c, "-o", str(tmp_path / "hard.npz")], "the input file of --calib"),
        (["stats", model, "--calib", "folder", "-o", "folder/s.npz"], "inside the folder given to --calib"),
        (
            ["stats", model, "--calib", "folder", "-o", "folder/part.npz"],
            "inside the folder given to --calib",
        ),
        (["compress", model, *c, "-o", "ft.py", "--finetune", "ft.py:keep"], "the input file of --finetune"),
        (["compress", model, *c, "-o", "ft.py", "--finetune", "ft:keep"], "the input file of --finetune"),
        (["compress", model, *c, "-o", "x.onnx", "--report", calib], "the input file of --calib"),
        (["compress", model, *c, "-o", "x.onnx", "--eval", "e.npz", "--report", "e.npz"], "of --eval"),
        (["compress", model, *c, "-o", "x.onnx", "--plot", model], "the input file"),
        (
            [
                "compress",
                model,
                *c,
                "-o",
                "x.onnx",
                "--torch-model",
                "factory.py:factory",
                "--train",
                calib,
                "--report",
                "factory.py",
            ],
            "the input file of --torch-model",
        ),
        (["stats", "ext.onnx", *c, "-o", "w.bin"], "the input file of the external data of MODEL"),
        (["compress", "ext.onnx", *c, "-o", "w.bin"], "the input file of the external data of MODEL"),
        (["compress", model, *c, "-o", "w", "--external-data"], None),  # control: writes w and w.data
    ]
    (tmp_path / "w.bin.data").write_text("not an input")
    for args, message in cases[:-1]:
        before = digests(tmp_path)
        line = one_line_error(runner.invoke(main, [*args, "--force"]))
        assert message in line and "choose another output path" in line, (args, line)
        assert digests(tmp_path) == before, args
    # OUT.data that is the input's external data: refused although only --external-data names it
    os.rename(tmp_path / "ext.onnx", tmp_path / "o.onnx.keep")
    save_external(two_convs(rng), tmp_path / "m2.onnx", "o.onnx.data")
    before = digests(tmp_path)
    line = one_line_error(
        runner.invoke(main, ["compress", "m2.onnx", *c, "-o", "o.onnx", "--external-data", "--force"])
    )
    assert "output o.onnx.data is the input file of the external data of MODEL" in line
    assert digests(tmp_path) == before


def test_output_plan_compares_file_identity(tmp_path):
    data = tmp_path / "data.npz"
    data.write_bytes(b"calibration")
    os.link(data, tmp_path / "alias")
    os.symlink(tmp_path / "alias", tmp_path / "chain")
    reads = [input_path("--calib", data)]
    for name in ("alias", "chain"):
        with pytest.raises(OutputError, match="is the input file of --calib"):
            plan_outputs([tmp_path / name], reads, force=True)
    assert plan_outputs([tmp_path / "fresh"], reads, force=False).outputs == (tmp_path / "fresh",)


def squatting_compress(paths: list[Path]):
    """The real compress, after which another process creates ``paths`` (as a second run would)."""
    real = egp_onnx.cli.commands.compress

    def run(*args, **kwargs):
        result = real(*args, **kwargs)
        for path in paths:
            path.write_text("another run's file")
        return result

    return run


def test_an_output_that_appears_during_the_run_is_not_clobbered(runner, tmp_path, rng, monkeypatch):
    model, calib = toy_files(tmp_path, rng)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    args = ["compress", model, "--calib", calib, "-o", str(out), "--report", str(report), "--sparsity", "0.5"]
    # the report (the second output) appears: the model (the first) must not be committed either
    monkeypatch.setattr("egp_onnx.cli.commands.compress", squatting_compress([report]))
    line = one_line_error(runner.invoke(main, args))
    assert line == (
        f"egp-onnx: error: output {report} appeared while egp-onnx ran; pass --force to overwrite it; "
        "nothing written"
    )
    assert report.read_text() == "another run's file" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx", "r.json"], "no temporaries left"
    report.unlink()
    monkeypatch.setattr("egp_onnx.cli.commands.compress", squatting_compress([out, report]))
    forced = runner.invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.stderr
    onnx.checker.check_model(onnx.load(str(out)))
    assert json.loads(report.read_text())["settings"]["sparsity"] == 0.5


def test_two_runs_with_the_same_output_one_wins(runner, tmp_path, rng):
    """The second run to commit is refused instead of silently replacing the first one's model."""
    model, calib = toy_files(tmp_path, rng)
    out = tmp_path / "o.onnx"
    args = ["compress", model, "--calib", calib, "-o", str(out), "--sparsity", "0.5", "--no-latency", "-q"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "egp_onnx", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        with proc:
            _, err = proc.communicate(timeout=120)
        results.append((proc.returncode, err))
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "exists; pass --force" in loser or "appeared while egp-onnx ran" in loser, loser
    onnx.checker.check_model(onnx.load(str(out)))


def test_writer_leaves_nothing_when_the_run_fails(tmp_path):
    plan = plan_outputs([tmp_path / "a.onnx", tmp_path / "b.json"], [], force=False)
    with pytest.raises(RuntimeError), OutputWriter(plan) as writer:
        writer.write_model(two_convs(np.random.default_rng(0)), tmp_path / "a.onnx", external=True)
        writer.write_bytes(tmp_path / "b.json", b"{}")
        raise RuntimeError("the run fails before commit")
    assert list(tmp_path.iterdir()) == []
    with OutputWriter(plan) as writer:
        writer.write_model(two_convs(np.random.default_rng(0)), tmp_path / "a.onnx", external=True)
        writer.write_bytes(tmp_path / "b.json", b"{}")
        assert writer.commit() == [tmp_path / "a.onnx.data", tmp_path / "a.onnx", tmp_path / "b.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.onnx.data", "b.json"]
    onnx.checker.check_model(str(tmp_path / "a.onnx"))


def test_model_inputs_list_external_data_files_and_skip_parsing_plain_models(rng, tmp_path):
    model = two_convs(rng)
    plain = save(model, tmp_path / "plain.onnx")
    save_external(model, tmp_path / "ext.onnx", "ext.onnx.data")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert [i.path for i in model_inputs(plain)] == [Path(plain)]
    assert [i.path for i in model_inputs(tmp_path / "ext.onnx")] == [
        tmp_path / "ext.onnx",
        tmp_path / "ext.onnx.data",
    ]
    assert [i.path for i in model_inputs(tmp_path / "empty.onnx")] == [tmp_path / "empty.onnx"]
