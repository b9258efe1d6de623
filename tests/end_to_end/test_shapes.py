"""Inputs of many sizes: a model with symbolic H/W calibrated with images of several sizes, as a
detector, an OCR model or a segmenter is, through analyze, stats and compress."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from cli_checks import one_line_error
from models import Builder, f32, save
from references import reference_activations, run_ort

import egp_onnx
from egp_onnx.cli.main import main
from egp_onnx.graph.rectifiers import find_rectifiers
from egp_onnx.load.calibration import open_calibration
from egp_onnx.load.model import load_model

#: (samples, H, W) of each calibration shard, in file order: three sizes, one of them twice
SHARDS = [(6, 12, 12), (5, 16, 10), (4, 12, 12), (5, 9, 14)]
#: (samples, H, W) of each eval shard: 16x10 is the most common size
EVAL = [(3, 12, 12), (5, 16, 10), (2, 9, 14)]


def detector(rng):
    """
    x(N,3,H,W) -> Conv3x3(3->8, pad 1) -> Relu r1 -> Conv3x3(8->8, stride 2, pad 1) -> Relu r2
      -> Conv1x1(8->2) -> y(N,2,ceil(H/2),ceil(W/2))                          (a map, as a detector's)
    """
    b = Builder(rng)
    h = b.op("Relu", [b.conv("x", "c1", 3, 8, 3, pad=1, bias=0.2)], "r1")
    h = b.op("Relu", [b.conv(h, "c2", 8, 8, 3, stride=2, pad=1, bias=0.2)], "r2")
    return b.model(b.conv(h, "c3", 8, 2, 1), ("N", 3, "H", "W"))


def shards(rng, folder, sizes):
    folder.mkdir()
    parts = []
    for i, (n, h, w) in enumerate(sizes):
        x = f32(rng.normal(size=(n, 3, h, w)))
        np.savez(folder / f"{i}.npz", x=x)
        parts.append(x)
    return parts


@pytest.fixture
def files(rng, tmp_path):
    model = save(detector(rng), tmp_path / "det.onnx")
    return model, shards(rng, tmp_path / "calib", SHARDS), shards(rng, tmp_path / "eval", EVAL)


def counted(model, parts):
    """ON counts per channel and events per channel of every ReLU, by onnxruntime, shape by shape."""
    on = {"r1": 0, "r2": 0}
    events = {"r1": 0, "r2": 0}
    for x in parts:
        values = reference_activations(load_model(model), ["r1", "r2"], {"x": x})
        for name, value in values.items():
            on[name] = on[name] + (value > 0).sum(axis=(0, 2, 3))
            events[name] += value.shape[0] * value.shape[2] * value.shape[3]
    return on, events


def test_statistics_count_every_position_of_every_size(files, tmp_path):
    model, calib, _ = files
    _, _, sites, stats = egp_onnx.statistics(model, tmp_path / "calib", batch_size=4)
    on, events = counted(model, calib)
    assert stats.samples == sum(n for n, _, _ in SHARDS)
    for site in sites:
        name = {"c1": "r1", "c2": "r2"}[site.owner.name] if site.owner else None
        counts = stats.counts[site.name]
        np.testing.assert_array_equal(counts.on, on[name])
        assert counts.total == events[name]
    report = egp_onnx.analyze(model, tmp_path / "calib", batch_size=4)
    assert report.samples == 20 and len(report.layers) == 2


def test_compress_judges_every_held_out_batch_and_states_the_shape_of_its_costs(files, tmp_path):
    model, _, evals = files
    result = egp_onnx.compress(
        model, tmp_path / "calib", eval_data=tmp_path / "eval", sparsity=0.3, guard=False, batch_size=4
    )
    report = result.report
    # fidelity over every eval sample, each compared at its own size
    diff_sq = ref_sq = 0.0
    for x in evals:
        (before,), (after,) = run_ort(load_model(model), {"x": x}), run_ort(result.model, {"x": x})
        assert after.shape == before.shape
        diff_sq += float(((after.astype(np.float64) - before) ** 2).sum())
        ref_sq += float((before.astype(np.float64) ** 2).sum())
    assert report.fidelity.samples == 10
    assert report.fidelity.rel_error == pytest.approx(np.sqrt(diff_sq / ref_sq), rel=1e-5)
    # MACs and latency at the eval data's most common size, 16x10 (5 of 10 samples)
    assert report.cost.input_shapes == {"x": (1, 3, 16, 10)}
    assert report.timing is not None and report.timing.input_shapes == {"x": (1, 3, 16, 10)}
    assert [t.batch_size for t in report.timing.batches] == [1, 4]
    dense = 8 * 3 * 9 * 16 * 10 + 8 * 8 * 9 * 8 * 5 + 2 * 8 * 8 * 5
    assert report.cost.before.macs == dense and report.cost.after.macs is not None
    saved = json.loads(json.dumps(report.to_dict()))
    assert saved["cost"]["input_shapes"] == {"x": [1, 3, 16, 10]}


def test_the_held_out_split_and_the_guard_take_samples_of_several_sizes(files, tmp_path):
    model, _, _ = files
    result = egp_onnx.compress(model, tmp_path / "calib", sparsity=0.2, max_rel_error=10.0, batch_size=4)
    assert result.report.fidelity.data == "holdout" and result.report.fidelity.samples == 10
    assert result.report.steps and result.report.steps[-1].accepted
    sizes = Counter()
    data = open_calibration(tmp_path / "calib", load_model(model))
    for feed, _ in data.batches(4):
        sizes[feed["x"].shape[2:]] += len(feed["x"])
    assert sizes == {(12, 12): 10, (16, 10): 5, (9, 14): 5}
    assert result.report.cost.input_shapes["x"][2:] in sizes


def test_the_command_line_runs_analyze_and_compress_on_a_folder_of_sizes(files, tmp_path, runner):
    model, _, _ = files
    calib = str(tmp_path / "calib")
    analyzed = runner.invoke(main, ["analyze", model, "--calib", calib])
    assert analyzed.exit_code == 0, analyzed.output + analyzed.stderr
    out, report = tmp_path / "small.onnx", tmp_path / "small.json"
    args = ["compress", model, "--calib", calib, "-o", str(out), "--report", str(report)]
    done = runner.invoke(main, [*args, "--sparsity", "0.3", "--no-guard", "--no-latency"])
    assert done.exit_code == 0, done.output + done.stderr
    assert "at x 1x3x12x12" in done.output.replace("\n            ", " ")
    assert json.loads(report.read_text())["cost"]["input_shapes"] == {"x": [1, 3, 12, 12]}


class Reader:
    """A CalibrationDataReader whose batches have different sizes."""

    def __init__(self, parts):
        self.parts = iter(parts)

    def get_next(self):
        x = next(self.parts, None)
        return None if x is None else {"x": x}


def test_a_reader_may_give_batches_of_different_sizes(files):
    model, calib, evals = files
    _, _, _, stats = egp_onnx.statistics(model, Reader(calib), batch_size=4)
    on, _ = counted(model, calib)
    sites = find_rectifiers(load_model(model))
    assert [stats.counts[s.name].on.tolist() for s in sites] == [on["r1"].tolist(), on["r2"].tolist()]
    result = egp_onnx.compress(model, Reader(calib), eval_data=Reader(evals), sparsity=0.3, guard=False)
    assert result.report.fidelity.samples == 10


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 4, 12, 12), r"input 'x' has shape \(2, 4, 12, 12\), the model expects \(\?, 3, \?, \?\)"),
        ((2, 3, 12), r"input 'x' has rank 3 \(2, 3, 12\), the model expects rank 4 \(\?, 3, \?, \?\)"),
    ],
)
def test_a_fixed_dim_that_does_not_fit_is_still_a_one_line_error(files, tmp_path, runner, shape, message):
    model, _, _ = files
    bad = tmp_path / "calib" / "9.npz"  # the last shard: found in the middle of a pass
    np.savez(bad, x=f32(np.ones(shape)))
    compress = ["compress", model, "-o", str(tmp_path / "o.onnx"), "--calib"]
    for command in (["analyze", model, "--calib"], compress):
        line = one_line_error(runner.invoke(main, [*command, str(tmp_path / "calib")]))
        assert str(tmp_path / "calib") in line and "(part 5)" in line
        assert re.search(message, line), line
    assert not (tmp_path / "o.onnx").exists()


def test_a_fixed_size_model_refuses_other_sizes_in_one_line(rng, tmp_path, runner):
    b = Builder(rng)
    h = b.op("Relu", [b.conv("x", "c1", 3, 8, 3, pad=1)], "r1")
    model = save(b.model(b.conv(h, "c2", 8, 2, 1), ("N", 3, 12, 12)), tmp_path / "fixed.onnx")
    shards(rng, tmp_path / "calib", [(4, 12, 12), (3, 16, 10)])
    line = one_line_error(runner.invoke(main, ["analyze", model, "--calib", str(tmp_path / "calib")]))
    assert line.endswith("input 'x' has shape (3, 3, 16, 10), the model expects (?, 3, 12, 12)"), line


def test_a_torch_export_with_dynamic_height_and_width(rng, tmp_path):
    """
    torch: x(N,3,H,W) -> Conv3x3 BN ReLU -> Conv3x3(stride 2) ReLU -> AdaptiveAvgPool(1) -> Flatten
      -> Linear(8->5)                        exported with dynamic_axes N, H, W (TorchScript exporter)
    """
    torch = pytest.importorskip("torch", reason="needs the torch extra: pip install 'egp-onnx[torch]'")
    import warnings

    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (torch.zeros(1, 3, 12, 12),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "y": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )
    dims = load_model(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "H", "W"]
    calib = shards(rng, tmp_path / "calib", SHARDS)
    evals = shards(rng, tmp_path / "eval", EVAL)
    proto, _, sites, stats = egp_onnx.statistics(path, tmp_path / "calib", batch_size=4)
    relus = [n.output[0] for n in proto.graph.node if n.op_type == "Relu"]
    for site, tensor in zip(sites, relus, strict=True):
        values = [reference_activations(proto, [tensor], {"x": x})[tensor] for x in calib]
        on = sum((value > 0).sum(axis=(0, 2, 3)) for value in values)
        np.testing.assert_array_equal(stats.counts[site.name].on, on)
    result = egp_onnx.compress(path, tmp_path / "calib", eval_data=tmp_path / "eval", sparsity=0.3)
    agree = sum(
        int((run_ort(proto, {"x": x})[0].argmax(1) == run_ort(result.model, {"x": x})[0].argmax(1)).sum())
        for x in evals
    )
    assert result.report.fidelity.top1_agreement == pytest.approx(agree / 10)
    assert result.report.cost.input_shapes == {"x": (1, 3, 16, 10)}
    assert result.report.cost.before.macs == 8 * 3 * 9 * 160 + 8 * 8 * 9 * 40 + 8 * 5


def test_a_size_the_model_cannot_run_is_one_line_naming_the_shape(rng, tmp_path, runner):
    """
    x(N,3,H,W) -> Conv3x3(stride 2, pad 1) -> Resize(x2) -> Add(+ Conv1x1(x)) -> Relu -> Conv1x1 -> y

    Every H/W is symbolic, yet an odd size cannot run: the upsampled map is one row larger.
    """
    b = Builder(rng)
    scales = b.init("scales", [1.0, 1.0, 2.0, 2.0], np.float32)
    up = b.op("Resize", [b.conv("x", "c1", 3, 4, 3, stride=2, pad=1), "", scales], "up", mode="nearest")
    joined = b.op("Relu", [b.op("Add", [up, b.conv("x", "c2", 3, 4, 1)], "add")], "r1")
    model = save(b.model(b.conv(joined, "c3", 4, 2, 1), ("N", 3, "H", "W")), tmp_path / "m.onnx")
    shards(rng, tmp_path / "calib", [(4, 16, 16), (3, 15, 16)])
    for command in (["analyze", model], ["compress", model, "-o", str(tmp_path / "o.onnx")]):
        line = one_line_error(runner.invoke(main, [*command, "--calib", str(tmp_path / "calib")]))
        # the batch's size: 3 in analyze, what the held-out split leaves of that shard in compress
        assert re.match(r"egp-onnx: error: onnxruntime rejected a batch \(x \(\d, 3, 15, 16\)\): ", line), (
            line
        )
