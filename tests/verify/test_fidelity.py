"""`verify` and the comparison behind it (verify/fidelity.py): outputs compared by name."""

from __future__ import annotations

import numpy as np
import onnx
from cli_checks import one_line_error
from click.testing import CliRunner
from conftest import SAMPLES
from models import inputs, save, two_convs
from onnx import helper, numpy_helper

from egp_onnx.cli.main import main

MODEL = SAMPLES / "digits_resnet.onnx"
TEST = SAMPLES / "digits_test.npz"


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
