"""Reliability (issue 13): no input lost, no partial or wrong output, no traceback, clean streams.

One test (or table) per class of defect; the last test sweeps every option with bad values.
"""

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
from click.testing import CliRunner
from conftest import ROOT, compress_plain
from models import _model, _x, _y, inputs, save, save_external, toy_files, two_convs
from onnx import TensorProto, helper, numpy_helper
from references import run_ort

import egp_onnx
from egp_onnx.cli.files import OutputWriter, input_path, model_inputs, plan_outputs
from egp_onnx.cli.main import main
from egp_onnx.errors import FinetuneError, OutputError


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def digests(folder: Path) -> dict[str, str]:
    """Content digest of every file under ``folder`` (hidden temporaries included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(result, exit_code: int = 2) -> str:
    """The single stderr line of a refused run (and no traceback anywhere)."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("egp-onnx: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    return lines[0]


def relu_output_model() -> onnx.ModelProto:
    """A ReLU whose output is the graph output; positive weights and biases keep both ReLUs ON.

    x(N,3,6,6) -> Conv3x3 c1 (+5) -> Relu r1 -> Conv1x1 c2 (+5) -> Relu r2 = y (graph output)
    """
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.uniform(0.05, 0.5, (4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.full(4, 5.0, np.float32), "b1"),
        numpy_helper.from_array(rng.uniform(0.05, 0.5, (4, 4, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.full(4, 5.0, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="c2"),
        helper.make_node("Relu", ["c2"], ["y"], name="r2"),
    ]
    return _model(nodes, [_x()], [_y((4, 4, 4))], inits)


# ------------------------------------------------------------------ 1. outputs never overwrite inputs
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


# ------------------------------------------------------------------ 2. all outputs or none
def test_missing_matplotlib_is_found_before_any_work(runner, tmp_path, rng, monkeypatch):
    model, calib = toy_files(tmp_path, rng)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError

    def no_work(*args, **kwargs):
        raise AssertionError("compress ran before the optional dependency was checked")

    monkeypatch.setattr("egp_onnx.cli.commands.compress", no_work)
    before = digests(tmp_path)
    args = [
        "compress",
        model,
        "--calib",
        calib,
        "-o",
        str(tmp_path / "o.onnx"),
        "--report",
        str(tmp_path / "r.json"),
    ]
    line = one_line_error(runner.invoke(main, [*args, "--plot", str(tmp_path / "p.png")]))
    assert line == "egp-onnx: error: --plot needs matplotlib: pip install 'egp-onnx[plot]'"
    assert digests(tmp_path) == before


def test_missing_torch_is_found_before_any_work(runner, tmp_path, rng, monkeypatch):
    model, calib = toy_files(tmp_path, rng)
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "egp_onnx.integrations.torch", None)
    monkeypatch.setattr(
        "egp_onnx.cli.commands.compress", lambda *a, **k: pytest.fail("compress ran without torch")
    )
    (tmp_path / "factory.py").write_text("def factory():\n    return None\n")
    before = digests(tmp_path)
    result = runner.invoke(
        main,
        [
            "compress",
            model,
            "--calib",
            calib,
            "-o",
            str(tmp_path / "o.onnx"),
            "--torch-model",
            f"{tmp_path / 'factory.py'}:factory",
            "--train",
            calib,
        ],
    )
    assert "torch" in one_line_error(result)
    assert digests(tmp_path) == before


def test_missing_pillow_is_found_before_any_work(runner, tmp_path, rng, monkeypatch):
    from models import image_model

    model = save(image_model(rng), tmp_path / "m.onnx")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setattr("egp_onnx.api.compress.collect_statistics", lambda *a, **k: pytest.fail("calibrated"))
    before = digests(tmp_path)
    args = ["compress", model, "--calib", str(tmp_path / "images"), "-o", str(tmp_path / "o.onnx")]
    line = one_line_error(runner.invoke(main, args))
    assert line == "egp-onnx: error: reading images needs Pillow: pip install 'egp-onnx[images]'"
    assert digests(tmp_path) == before


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


# ------------------------------------------------------------------ 3. finetune results checked
def _zeros_of_one(model, masks):
    return {k: np.zeros((1,), np.float32) for k in masks}


def _nan(model, masks):
    return {k: np.full(v.shape, np.nan, np.float32) for k, v in masks.items()}


def _float64(model, masks):
    return {k: np.ones(v.shape) for k, v in masks.items()}


def _raises(model, masks):
    raise RuntimeError("CUDA out of memory")


def _wrong_model(model, masks):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((2, 2), np.float32), "w"))
    return copy


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (
            _zeros_of_one,
            "the finetune callback _zeros_of_one returned tensor 'w' with shape (1,); "
            "the model's is (4, 3, 3, 3)",
        ),
        (_nan, "the finetune callback _nan returned tensor 'w' with NaN or Inf values"),
        (
            _float64,
            "returned tensor 'w' as float64; the model's is float32 (convert with .astype(np.float32))",
        ),
        (_raises, "the finetune callback _raises failed: RuntimeError: CUDA out of memory"),
        (_wrong_model, "the finetune callback _wrong_model returned tensor 'w' with shape (2, 2)"),
    ],
)
def test_finetune_returns_are_checked(callback, message, tmp_path, rng):
    model, calib = toy_files(tmp_path, rng)
    with pytest.raises(FinetuneError) as caught:
        compress_plain(model, calib, sparsity=0.5, finetune=callback, latency=False)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_finetune_writes_nothing(runner, tmp_path, rng, monkeypatch):
    model, calib = toy_files(tmp_path, rng)
    (tmp_path / "hooks.py").write_text(
        "import numpy as np\ndef bad(model, masks):\n    return {'w': np.zeros(1, np.float32)}\n"
    )
    before = digests(tmp_path)
    result = runner.invoke(
        main,
        [
            "compress",
            model,
            "--calib",
            calib,
            "-o",
            str(tmp_path / "o.onnx"),
            "--finetune",
            f"{tmp_path / 'hooks.py'}:bad",
            "--report",
            str(tmp_path / "r.json"),
        ],
    )
    assert "returned tensor 'w' with shape (1,)" in one_line_error(result)
    assert digests(tmp_path) == before


# ------------------------------------------------------------------ 4. no traceback
def test_relu_that_is_a_graph_output_is_removed(tmp_path):
    model = relu_output_model()
    x = np.random.default_rng(3).uniform(0, 1, (16, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    save(model, tmp_path / "m.onnx")
    kept = compress_plain(tmp_path / "m.onnx", tmp_path / "c.npz", sparsity=0.5, surgery=False, latency=False)
    result = compress_plain(tmp_path / "m.onnx", tmp_path / "c.npz", sparsity=0.5, latency=False)
    surgery = result.report.surgery
    assert not surgery.reverted
    removed = {r.nodes[0] for r in surgery.rewrites if r.kind == "remove_rectifier"}
    assert removed == {"r1", "r2"}
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert "Relu" not in {n.op_type for n in result.model.graph.node}
    onnx.checker.check_model(result.model, full_check=True)
    np.testing.assert_allclose(
        run_ort(result.model, {"x": x})[0], run_ort(kept.model, {"x": x})[0], rtol=1e-4, atol=1e-4
    )


def test_one_hot_labels_count_as_their_argmax(tmp_path):
    rng = np.random.default_rng(11)
    model = two_convs(rng)
    flat = helper.make_node("Flatten", ["y"], ["f"], name="flat")
    head = helper.make_node("Gemm", ["f", "hw"], ["logits"], name="fc", transB=1)
    model.graph.node.extend([flat, head])
    model.graph.initializer.append(
        numpy_helper.from_array(rng.normal(size=(5, 144)).astype(np.float32), "hw")
    )
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]))
    save(model, tmp_path / "m.onnx")
    x = inputs(rng, n=40)
    labels = rng.integers(0, 5, 40)
    np.savez(tmp_path / "index.npz", x=x, labels=labels)
    np.savez(tmp_path / "onehot.npz", x=x, labels=np.eye(5, dtype=np.float32)[labels])
    want = float((run_ort(model, {"x": x})[0].argmax(1) == labels).mean())
    for eval_file in ("index.npz", "onehot.npz"):
        report = compress_plain(
            tmp_path / "m.onnx",
            tmp_path / "index.npz",
            sparsity=0.3,
            eval_data=tmp_path / eval_file,
            latency=False,
        ).report
        assert report.fidelity.accuracy_before == pytest.approx(want)
    np.savez(tmp_path / "cube.npz", x=x, labels=np.zeros((40, 5, 2)))
    with pytest.raises(egp_onnx.EgpError, match=r"'labels' have shape \(40, 5, 2\); give class indices"):
        compress_plain(tmp_path / "m.onnx", tmp_path / "index.npz", eval_data=tmp_path / "cube.npz")


def test_unexpected_errors_are_one_line_with_a_trace_on_demand(runner, tmp_path, rng, monkeypatch):
    model, calib = toy_files(tmp_path, rng)

    def defect(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("egp_onnx.cli.commands.compress", defect)
    args = ["compress", model, "--calib", calib, "-o", str(tmp_path / "o.onnx")]
    line = one_line_error(runner.invoke(main, args), exit_code=3)
    assert line.startswith("egp-onnx: internal error: ZeroDivisionError: division by zero")
    debug = runner.invoke(main, ["--debug", *args])
    assert debug.exit_code == 3 and "Traceback" in debug.stderr and "ZeroDivisionError" in debug.stderr


def test_a_closed_stdout_is_not_a_traceback(tmp_path, rng):
    """`egp-onnx analyze ... | head -1`: the reader goes away; no trace, no internal error."""
    model, calib = toy_files(tmp_path, rng)
    with subprocess.Popen(
        [sys.executable, "-m", "egp_onnx", "analyze", model, "--calib", calib],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as proc:
        proc.stdout.close()
        err = proc.stderr.read().decode()
    assert proc.returncode in (0, 1) and err == "", err


def test_external_data_outside_or_missing_is_refused(runner, tmp_path, rng):
    model = two_convs(rng)
    np.savez(tmp_path / "c.npz", x=inputs(rng))
    (tmp_path / "m").mkdir()
    save_external(model, tmp_path / "m" / "gone.onnx", "gone.bin")
    (tmp_path / "m" / "gone.bin").unlink()
    outside = onnx.load(str(tmp_path / "m" / "gone.onnx"), load_external_data=False)
    for tensor in outside.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../c.npz"
    onnx.save(outside, str(tmp_path / "m" / "out.onnx"))
    c = ["--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o.onnx")]
    gone = one_line_error(runner.invoke(main, ["compress", str(tmp_path / "m" / "gone.onnx"), *c]))
    assert "external data file gone.bin of tensor 'w' not found beside the model" in gone
    far = one_line_error(runner.invoke(main, ["compress", str(tmp_path / "m" / "out.onnx"), *c]))
    assert "tensor 'w' keeps its data at '../c.npz', outside the model's folder" in far


# ------------------------------------------------------------------ 7. quiet and clean streams
INITIALIZER_INPUTS = """
import sys
import onnx
from onnx import helper
sys.path.insert(0, {tests!r})
import numpy as np
from models import two_convs
model = two_convs(np.random.default_rng(0))
for t in model.graph.initializer:
    model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
{session}
"""


@pytest.mark.parametrize(
    ("session", "leaks"),
    [
        (  # a bare session on purpose, not run_ort: the control shows onnxruntime's own logging
            "import onnxruntime as ort; "
            "ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])",
            True,
        ),
        (
            "from egp_onnx.runtime.session import STATISTICS, make_session; make_session(model, STATISTICS)",
            False,
        ),
    ],
    ids=["plain onnxruntime (control)", "egp-onnx session"],
)
def test_onnxruntime_log_lines_never_reach_stderr(session, leaks):
    code = INITIALIZER_INPUTS.format(tests=str(ROOT / "tests"), session=session)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert ("onnxruntime" in proc.stderr) is leaks, proc.stderr


def cli(*args: str) -> subprocess.CompletedProcess:
    """The command line in its own process: logging and stderr exactly as a user sees them."""
    return subprocess.run(
        [sys.executable, "-m", "egp_onnx", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_quiet_prints_nothing_but_errors(tmp_path, rng):
    model = two_convs(rng)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # a fixed batch of 4: a warning
    save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=10))
    args = ["compress", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "--sparsity", "0.5"]
    args += ["--holdout", "0", "--no-guard"]  # all 10 samples calibrate
    loud = cli(*args, "-o", str(tmp_path / "a.onnx"))
    assert loud.returncode == 0 and loud.stdout, loud.stderr
    assert loud.stderr.startswith("egp-onnx: WARNING: ") and "2 of 10 samples" in loud.stderr
    quiet = cli(*args, "-o", str(tmp_path / "b.onnx"), "--quiet")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    again = cli(*args, "-o", str(tmp_path / "b.onnx"), "--quiet")
    assert again.returncode == 2 and again.stdout == ""
    assert (
        again.stderr
        == f"egp-onnx: error: output {tmp_path / 'b.onnx'} exists; pass --force to overwrite it\n"
    )


def test_verify_with_different_output_names_says_so(runner, tmp_path, rng):
    model = two_convs(rng)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.node.append(helper.make_node("Identity", ["y"], ["q"], name="rename"))
    renamed.graph.output[0].name = "q"
    save(model, tmp_path / "a.onnx")
    save(renamed, tmp_path / "b.onnx")
    np.savez(tmp_path / "d.npz", x=inputs(rng))
    result = runner.invoke(
        main,
        ["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--data", str(tmp_path / "d.npz")],
    )
    assert one_line_error(result) == (
        "egp-onnx: error: the models' outputs differ: the compressed model has no output y (its outputs: q); "
        "outputs are compared by name"
    )


# ------------------------------------------------------------------ 8. nothing dropped silently
def test_samples_that_do_not_fill_a_fixed_batch_are_counted(tmp_path, rng, caplog):
    model = two_convs(rng)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=10))
    with caplog.at_level("WARNING", logger="egp_onnx"):
        report = compress_plain(model, tmp_path / "c.npz", sparsity=0.5, latency=False).report
    warned = [r.getMessage() for r in caplog.records if "fixed at 4" in r.getMessage()]
    assert warned == [
        f"{tmp_path / 'c.npz'}: the model's batch size is fixed at 4: 2 of 10 samples do not fill a batch "
        "and are not used (give a multiple of 4 samples)"
    ], "said once, with the count"
    assert report.samples == 8 and report.fidelity.samples == 8


# ------------------------------------------------------------------ 9. hygiene
def test_no_onnxruntime_profile_dumps_in_the_repository():
    assert not list(ROOT.glob("onnxruntime_profile__*.json"))
    assert "onnxruntime_profile__*.json" in (ROOT / ".gitignore").read_text().splitlines()


# ------------------------------------------------------------------ the sweep: every option, bad values
def sweep_cases(
    tmp_path: Path, rng: np.random.Generator
) -> dict[str, tuple[list[str], dict[str, list[list[str]]]]]:
    """Per command: valid base arguments, and per option the bad arguments that replace or extend them."""
    model, calib = toy_files(tmp_path, rng)
    np.savez(tmp_path / "names.npz", image=inputs(rng))
    (tmp_path / "text.onnx").write_text("not a model\n")
    (tmp_path / "notes.txt").write_text("not data\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "exists.onnx").write_bytes(b"precious")
    (tmp_path / "hooks.py").write_text(
        "import numpy as np\nVALUE = 3\n"
        "def wrong_shape(model, masks):\n    return {'w': np.zeros(1, np.float32)}\n"
    )
    other = tmp_path / "other.stats.npz"
    assert (
        CliRunner()
        .invoke(main, ["stats", str(SAMPLE), "--calib", str(SAMPLE_CALIB), "-o", str(other)])
        .exit_code
        == 0
    )
    t = str(tmp_path)
    missing = [f"{t}/nope.npz"]
    data_bad = {
        "--batch-size": [["--batch-size", v] for v in ("0", "-1", "abc", "1.5")],
        "--workers": [["--workers", v] for v in ("-1", "abc")],
        "--mean": [["--mean", v] for v in ("nan", "inf", "abc", "")],
        "--std": [["--std", v] for v in ("0", "nan", "-inf", "abc")],
    }
    out_bad = [[v] for v in (t, f"{t}/no/o.onnx", f"{t}/exists.onnx", model, calib)]
    analyze = {
        "MODEL": [[f"{t}/nope.onnx"], [f"{t}/text.onnx"], [t]],
        "--calib": [["--calib", v] for v in (*missing, f"{t}/notes.txt", f"{t}/empty", f"{t}/names.npz")],
        "--stats": [["--stats", v] for v in (*missing, calib, str(other))],
        "--json": [["--json", v] for v in (t, f"{t}/no/a.json", f"{t}/exists.onnx", calib, model)],
        **data_bad,
    }
    compress = {
        "-o": [["-o", *v] for v in out_bad],
        "--sparsity": [["--sparsity", v] for v in ("nan", "inf", "-0.1", "1", "abc")],
        "--step": [["--step", v] for v in ("nan", "0", "1.5", "-inf")],
        "--method": [["--method", "foo"]],
        "--eval": [["--eval", v] for v in (*missing, f"{t}/names.npz", f"{t}/notes.txt")],
        "--holdout": [["--holdout", v] for v in ("nan", "-0.1", "1", "inf")],
        "--min-agreement": [["--min-agreement", v] for v in ("nan", "-0.5", "1.5")],
        "--max-rel-error": [["--max-rel-error", v] for v in ("nan", "-1", "inf")],
        "--report": [["--report", v] for v in (t, f"{t}/no/r.json", f"{t}/exists.onnx", calib)],
        "--seed": [["--seed", v] for v in ("-5", "abc", "1.5")],
        "--stats": [["--stats", v] for v in (*missing, calib, str(other))],
        "--finetune": [
            ["--finetune", v]
            for v in (
                "nocolon",
                f"{t}/nope.py:fn",
                f"{t}/hooks.py:missing",
                f"{t}/hooks.py:VALUE",
                f"{t}/hooks.py:wrong_shape",
                "no_such_module:fn",
            )
        ],
        "--torch-model": [
            ["--torch-model", "nocolon", "--train", calib],
            ["--torch-model", f"{t}/hooks.py:VALUE"],
            ["--torch-model", f"{t}/nope.py:factory", "--train", calib],
            ["--torch-model", f"{t}/hooks.py:VALUE", "--finetune", f"{t}/hooks.py:wrong_shape"],
        ],
        "--train": [["--train", calib], ["--train", *missing]],
        "--epochs": [["--epochs", v] for v in ("0", "-1", "abc")],
        "--lr": [["--lr", v] for v in ("nan", "0", "-1", "inf")],
        "--merge-tolerance": [["--merge-tolerance", v] for v in ("nan", "-1", "inf")],
        "--select": [["--select", "foo"], ["--select", "obs", "--no-reconstruct"]],
        "--layer-cap": [["--layer-cap", v] for v in ("nan", "0", "1.5", "inf", "abc")],
        "--plot": [["--plot", v] for v in (f"{t}/p.xyz", f"{t}/plot", f"{t}/no/p.png", calib)],
        "--bogus": [["--bogus"]],
        **{k: v for k, v in analyze.items() if k in ("MODEL", "--calib")},
        **data_bad,
    }
    stats = {
        "-o": [["-o", *v] for v in out_bad],
        **{k: v for k, v in analyze.items() if k in ("MODEL", "--calib")},
        **data_bad,
    }
    verify = {
        "ORIGINAL": [[f"{t}/nope.onnx"], [f"{t}/text.onnx"]],
        "COMPRESSED": [[model, f"{t}/nope.onnx"], [model, f"{t}/exists.onnx"]],
        "--data": [["--data", v] for v in (*missing, f"{t}/names.npz", f"{t}/notes.txt")],
        "--atol": [["--atol", v] for v in ("-1", "nan", "inf", "abc")],
        "--rtol": [["--rtol", v] for v in ("nan", "-1", "inf")],
        "--min-agreement": [["--min-agreement", v] for v in ("2", "nan", "-1")],
        "--batch-size": [["--batch-size", v] for v in ("0", "abc")],
    }
    return {
        "analyze": ([model, "--calib", calib], analyze),
        "stats": ([model, "--calib", calib, "-o", f"{t}/s.npz"], stats),
        "compress": (
            [model, "--calib", calib, "-o", f"{t}/o.onnx", "--sparsity", "0.5", "--no-latency"],
            compress,
        ),
        "verify": ([model, model, "--data", calib], verify),
    }


SAMPLE = ROOT / "sample_models" / "digits_resnet.onnx"
SAMPLE_CALIB = ROOT / "sample_models" / "digits_calib.npz"


def bad_invocation(base: list[str], option: str, bad: list[str]) -> list[str]:
    """The base arguments with ``bad`` in place of ``option``'s value (or the positional arguments)."""
    if option.isupper():  # positional: MODEL / ORIGINAL / COMPRESSED replace the leading arguments
        return [*bad, *base[len(bad) :]]
    args = list(base)
    if option in args:
        at = args.index(option)
        del args[at : at + 2]
    return [*args, *bad]


def test_every_option_with_bad_values_gives_one_line_and_no_traceback(runner, tmp_path, rng):
    cases = sweep_cases(tmp_path, rng)
    for command, (_, table) in cases.items():
        params = main.commands[command].params
        wanted = {
            p.opts[0] if p.opts[0].startswith("-") else p.name.upper()
            for p in params
            if not getattr(p, "is_flag", False)
        }
        wanted -= {"--help"}
        given = {o for o in table if o in wanted or o == "--bogus"}
        assert wanted <= given, f"{command}: no bad values for {sorted(wanted - given)}"
    before = digests(tmp_path)
    count = 0
    for command, (base, table) in cases.items():
        for option, bad_values in table.items():
            for bad in bad_values:
                args = [command, *bad_invocation(base, option, bad)]
                result = runner.invoke(main, args)
                assert result.exit_code not in (0, None), args
                assert isinstance(result.exception, SystemExit), (args, result.exception)
                lines = result.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("egp-onnx: "), (args, result.stderr)
                assert "internal error" not in lines[0], (args, lines[0])
                assert "Traceback" not in result.output + result.stderr, args
                count += 1
    assert digests(tmp_path) == before, "a refused run wrote or changed a file"
    assert count > 100
    for args in (["--bogus"], ["nope"], ["compress"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    bare = runner.invoke(main, [])
    assert bare.exit_code in (0, 2) and "Usage: main [OPTIONS] COMMAND" in bare.output + bare.stderr
    assert "egp-onnx: error" not in bare.output + bare.stderr


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
