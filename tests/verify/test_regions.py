"""Probability maps are judged by their thresholded regions (what a DBNet pipeline does with them)."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import REPORT_SCHEMA
from onnx import TensorProto, helper, numpy_helper

from egp_onnx.cli.main import main
from egp_onnx.config import DEFAULT_MAP_THRESHOLD, DEFAULT_MIN_IOU, Settings
from egp_onnx.load.calibration import open_calibration
from egp_onnx.verify.fidelity import FidelitySums, Reference, region_iou
from egp_onnx.verify.guard import SURGERY_ATOL, SURGERY_RTOL, default_thresholds, guard_problems

SIDE = 8


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p))


def _sigmoid_map(shift: np.ndarray) -> onnx.ModelProto:
    """y(N,1,8,8) = Sigmoid(x + shift): a candidate is the same map with its logits moved by ``shift``."""
    nodes = [
        helper.make_node("Add", ["x", "shift"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "prob_map", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, SIDE, SIDE])],
        [numpy_helper.from_array(shift.astype(np.float32).reshape(1, 1, SIDE, SIDE), "shift")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


#: The original's map on every sample: background 0.01, a faint region at 0.32 (just above DBNet's
#: 0.3) and a confident one at 0.95.
FAINT, CONFIDENT = (slice(0, 2), slice(0, 5)), (slice(4, 8), slice(0, 8))


def _pattern() -> np.ndarray:
    p = np.full((SIDE, SIDE), 0.01)
    p[FAINT], p[CONFIDENT] = 0.32, 0.95
    return p


def _reference(rng: np.random.Generator, tmp_path) -> Reference:
    logits = _logit(_pattern()) + rng.normal(scale=0.02, size=(64, 1, SIDE, SIDE))
    np.savez(tmp_path / "maps.npz", x=logits.astype(np.float32))
    original = _sigmoid_map(np.zeros((SIDE, SIDE)))
    return Reference(original, open_calibration(tmp_path / "maps.npz", original), 16)


def _shift(**to: float) -> np.ndarray:
    """Logit shifts taking the pattern's regions (faint, confident, background) to new probabilities."""
    p = _pattern()
    target = p.copy()
    regions = {"faint": FAINT, "confident": CONFIDENT}
    for region, value in to.items():
        if region == "background":
            target[p == 0.01] = value
        else:
            target[regions[region]] = value
    return _logit(target) - _logit(p)


def test_a_probability_map_is_judged_by_its_regions_not_its_l2(rng, tmp_path):
    reference = _reference(rng, tmp_path)
    assert reference.kinds() == ["probability"]
    settings = default_thresholds(Settings(), reference)
    assert (settings.min_iou, settings.max_rel_error, settings.min_agreement) == (DEFAULT_MIN_IOU, None, None)

    def judge(shift):
        fid = reference.evaluate(_sigmoid_map(shift), SURGERY_ATOL, SURGERY_RTOL)
        regions = guard_problems(fid, None, settings.max_rel_error, min_iou=settings.min_iou)
        return fid.outputs[0], regions, guard_problems(fid, None, 0.05)

    # the faint region drops to 0.28: 2% relative L2, but 10 of 42 text pixels are lost
    out, regions, l2 = judge(_shift(faint=0.28))
    assert out.rel_error < 0.05 and l2 == []
    assert out.iou == pytest.approx(32 / 42) and out.threshold == DEFAULT_MAP_THRESHOLD
    assert len(regions) == 1 and regions[0].startswith("output y: mean IoU of the regions > 0.3 0.7619")
    # background up to 0.2, text down to 0.6 (0.34 for the faint part): far in L2, the same regions
    out, regions, l2 = judge(_shift(background=0.2, confident=0.6, faint=0.34))
    assert out.rel_error > 0.3 and l2 and out.iou == 1.0 and out.iou_worst == 1.0
    assert regions == []
    # --max-rel-error alone judges it by relative error, as before
    strict = default_thresholds(Settings(max_rel_error=0.05), reference)
    assert strict.min_iou is None
    fid = reference.evaluate(_sigmoid_map(_shift(background=0.2)), SURGERY_ATOL, SURGERY_RTOL)
    assert guard_problems(fid, None, strict.max_rel_error, min_iou=strict.min_iou)[0].startswith(
        "output y: relative error"
    )


def test_the_threshold_decides_where_regions_are_cut(rng, tmp_path):
    """At 0.5 the faint region is background to both models: the drop to 0.28 changes nothing."""
    logits = _logit(_pattern()) + rng.normal(scale=0.02, size=(16, 1, SIDE, SIDE))
    np.savez(tmp_path / "maps.npz", x=logits.astype(np.float32))
    original = _sigmoid_map(np.zeros((SIDE, SIDE)))
    reference = Reference(original, open_calibration(tmp_path / "maps.npz", original), 16, threshold=0.5)
    out = reference.evaluate(_sigmoid_map(_shift(faint=0.28))).outputs[0]
    assert (out.iou, out.threshold) == (1.0, 0.5)


def test_region_iou_per_sample():
    ref = np.zeros((3, 1, 2, 2))
    ref[0, 0, 0] = 0.9  # two pixels of text
    cand = ref.copy()
    cand[0, 0, 0, 0] = 0.1  # one lost
    cand[1, 0, 1, 1] = 0.7  # text where the original sees none
    cand[2] = np.nan  # a broken candidate on a page without text
    assert region_iou(ref, cand, 0.3).tolist() == [0.5, 0.0, 0.0]
    assert region_iou(ref, ref, 0.3).tolist() == [1.0, 1.0, 1.0]  # no text on either: agreement


def test_a_map_outside_zero_one_on_any_batch_keeps_relative_error():
    sums = FidelitySums(["y"], 1e-4, 1e-3)
    inside = np.full((2, 1, 4, 4), 0.5)
    sums.add([inside], [inside], None)
    sums.add([inside * 3], [inside * 3], None)  # a logit map, not probabilities
    out = sums.result().outputs[0]
    assert out.kind == "map" and out.iou is None


def test_the_report_states_the_region_rule(rng, tmp_path):
    """A small detector end to end: a Sigmoid map, its IoU fields in the schema, and the summary."""

    def init(name, *shape):
        values = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))
        return numpy_helper.from_array(values.astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "w2"], ["z"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Sigmoid", ["z"], ["y"], name="prob"),
    ]
    graph = helper.make_graph(
        nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 12, 12])],
        [init("w1", 16, 1, 3, 3), init("b1", 16), init("w2", 1, 16, 3, 3)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "det.onnx")
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(96, 1, 12, 12)).astype(np.float32))
    report_path = tmp_path / "r.json"
    args = [
        "compress", str(tmp_path / "det.onnx"), "--calib", str(tmp_path / "c.npz"),
        "-o", str(tmp_path / "o.onnx"), "--report", str(report_path),
        "--sparsity", "0.5", "--no-latency", "--map-threshold", "0.4",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 1), result.output
    report = json.loads(report_path.read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["settings"]["min_iou"] == DEFAULT_MIN_IOU and report["settings"]["max_rel_error"] is None
    (out,) = report["fidelity"]["outputs"]
    assert out["kind"] == "probability" and out["threshold"] == 0.4
    assert 0 <= out["iou_worst"] <= out["iou"] <= 1 and out["iou_se"] >= 0
    assert all(step["iou"] is not None for step in report["steps"])
    assert "rel_err   iou     accepted" in result.output  # the step table's column
    assert "regions     y: mean IoU" in result.output
    assert f"mean IoU of the regions > 0.4 >= {DEFAULT_MIN_IOU} (probability maps)" in result.output
