"""`--channels` through compress: a torch-exported network, the guard, and nothing to remove."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from models import Builder, f32
from references import run_ort

import egp_onnx
from egp_onnx.config import Settings
from egp_onnx.errors import FinetuneError
from egp_onnx.report.render import compression_summary
from egp_onnx.verify.cost import count_macs

torch = pytest.importorskip("torch", reason="needs the optional torch extra: pip install 'egp-onnx[torch]'")
from torch import nn  # noqa: E402


class _Block(nn.Module):
    def __init__(self, c: int, inner: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, inner, 3, padding=1, bias=False), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = nn.Conv2d(inner, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _Net(nn.Module):
    """stem -> residual block -> [branch a | branch b] concat -> pool -> flatten -> fc1 -> relu -> fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = _Block(8, 12)
        self.a = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU())
        self.b = nn.Sequential(
            nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU()
        )
        self.fc1, self.fc2 = nn.Linear(12 * 4 * 4, 12), nn.Linear(12, 5)

    def forward(self, x):
        y = self.block(self.stem(x))
        y = nn.functional.max_pool2d(torch.cat([self.a(y), self.b(y)], 1), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(y, 1))))


def _exported() -> onnx.ModelProto:
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        # dead channels on any input: zero weights, a negative bias after BN or the conv
        net.block.conv1.weight[3] = 0
        net.block.bn1.bias[3] = -1.0
        net.a[0].weight[2] = 0
        net.a[0].bias[2] = -1.0
        net.b[2].weight[5] = 0  # depthwise channel 5 of branch b
        net.b[2].bias[5] = -1.0
        net.fc1.weight[7] = 0
        net.fc1.bias[7] = -1.0
    buffer = io.BytesIO()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; dynamo needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net, (x,), buffer, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False,
            dynamic_axes={"x": {0: "N"}},
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def test_dead_channels_of_a_torch_network_leave_exactly(rng, tmp_path):
    """Without a guard only always-OFF channels go: the outputs on the calibration data stay, per element.

    The groups' widths (12, 6, 6, 12) are not multiples of 8, so no alignment holds a channel back.

    The four channels made dead go wherever they sit (after BN, behind a Concat into a Flatten-Gemm,
    after a depthwise conv, in fc1); a random network has more that are OFF on every sample.
    """
    model = _exported()
    x = f32(rng.normal(size=(64, 3, 8, 8)))
    np.savez(tmp_path / "calib.npz", x=x)
    result = egp_onnx.compress(
        model, tmp_path / "calib.npz", channels=True, sparsity=0.0, guard=False, holdout=0.0, latency=False
    )  # holdout 0: the statistics see every sample compared below
    onnx.checker.check_model(result.model, full_check=True)
    record = result.report.channels
    assert record is not None
    exact = {g.producer: g.always_off_removed for g in record.groups}
    assert all(exact[p] >= 1 for p in ("/block/conv1/Conv", "/a/a.0/Conv", "/b/b.0/Conv", "/fc1/Gemm")), exact
    assert all(g.channels - g.kept == g.always_off_removed for g in record.groups)
    tied = dict(record.tied)
    assert "grouped" in tied["/b/b.2/Conv"]
    stream = next(g for g in record.groups if g.producer == "/stem/stem.0/Conv")  # stem + block.conv2
    assert stream.rectifier.count(",") == 1  # the stem's ReLU and the block's last one
    (want,), (got,) = run_ort(model, {"x": x}), run_ort(result.model, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    shapes = {"x": (1, 3, 8, 8)}
    assert count_macs(result.model, shapes)[0] < count_macs(model, shapes)[0]


def test_the_guard_keeps_priced_removal_within_it(rng, tmp_path):
    model = _exported()
    np.savez(tmp_path / "calib.npz", x=f32(rng.normal(size=(600, 3, 8, 8))))
    result = egp_onnx.compress(
        model, tmp_path / "calib.npz", channels=True, sparsity=0.0, max_rel_error=0.05, latency=False
    )
    record = result.report.channels
    assert record is not None and record.removed > 4
    assert result.report.fidelity.rel_error <= 0.05
    assert all(s.rel_error <= 0.05 for s in record.steps if s.accepted and s.rel_error is not None)
    assert record.macs_after < record.macs_before


def test_a_model_with_nothing_removable_says_so_in_one_line(rng, tmp_path, caplog):
    """
    x -> Conv "a" -> Relu -> Add(x) -> y   (the only layer's channels meet x and reach the output)
    """
    b = Builder(rng)
    model = b.model(
        b.op("Add", [b.op("Relu", [b.conv("x", "a", 3, 3, 3, pad=1)], "r"), "x"], "add"), ["N", 3, 6, 6]
    )
    np.savez(tmp_path / "calib.npz", x=f32(rng.normal(size=(16, 3, 6, 6))))
    with caplog.at_level(logging.WARNING):
        result = egp_onnx.compress(
            model, tmp_path / "calib.npz", channels=True, sparsity=0.0, guard=False, latency=False
        )
    lines = [r.getMessage() for r in caplog.records if "channels:" in r.getMessage()]
    assert lines == [
        "channels: nothing removable (1 layer(s) with tied channels; first a: output (Identity) before any "
        "rectifier)"
    ]
    assert result.report.channels is not None and result.report.channels.removed == 0


def test_weight_pruning_after_channel_removal_ends_at_the_narrowed_model_when_its_first_step_fails(
    rng, tmp_path
):
    """Channels first, weights second: the channel stage spends the guard, the loop may find nothing left."""
    model = _exported()
    np.savez(tmp_path / "calib.npz", x=f32(rng.normal(size=(600, 3, 8, 8))))
    result = egp_onnx.compress(
        model, tmp_path / "calib.npz", channels=True, max_rel_error=0.05, latency=False
    )
    record = result.report.channels
    assert record is not None and record.removed > 0
    assert result.report.fidelity.rel_error <= 0.05
    assert result.report.stop.reason in ("guard", "target", "no-weights-left")
    onnx.checker.check_model(result.model, full_check=True)


def test_one_group_at_a_time_takes_the_aligned_cut_that_saves_most_macs_per_price():
    """Once the halved steps round to nothing at the 16-channel alignment, the stage cuts one group."""
    from egp_onnx.api.channels import _single_cut
    from egp_onnx.graph.channels import channel_groups
    from egp_onnx.surgery.narrow import narrowed

    model = onnx.load(str(SAMPLES / "mnist_resnet.onnx"))
    groups, _ = channel_groups(model)
    now = {g.producer: g for g in groups}
    shapes = {"image": (1, 1, 28, 28)}
    rng = np.random.default_rng(0)
    prices = {g.producer: rng.uniform(1, 2, size=g.channels) for g in groups}
    cut = _single_cut(model, groups, now, {}, prices, Settings(), shapes)
    ((producer, picked),) = cut.items()
    assert picked.size == 16 and now[producer].channels in (32, 64)  # a 16-channel group keeps all
    np.testing.assert_array_equal(picked, np.sort(np.argsort(prices[producer], kind="stable")[:16]))
    before = count_macs(model, shapes)[0]

    def score(g):  # independently: the price of its 16 cheapest channels per MAC saved
        cheapest = np.sort(prices[g.producer])[:16]
        index = np.sort(np.argsort(prices[g.producer], kind="stable")[:16])
        return cheapest.sum() / (before - count_macs(narrowed(model, [g], {g.producer: index}), shapes)[0])

    assert producer == min((g for g in groups if g.channels > 16), key=score).producer


def _faint_block(rng, scale: float) -> onnx.ModelProto:
    """
    x -> Conv "stem" -> Relu "r0" -+-> Conv "c1" -> BN -> Relu -> Conv "c2" -> BN -> Add "add1"
                                   +----------------------------------------------------^
    add1 -> Relu -> Conv "head" -> y
    ``scale`` multiplies c2's weights: near 0 the branch is nearly a constant.
    """
    b = Builder(rng)
    r0 = b.op("Relu", [b.conv("x", "stem", 3, 8, 3, pad=1)], "r0")
    r1 = b.op("Relu", [b.bn(b.conv(r0, "c1", 8, 8, 3, pad=1), "bn1", 8)], "r1")
    add = b.op("Add", [b.bn(b.conv(r1, "c2", 8, 8, 3, pad=1), "bn2", 8), r0], "add1")
    model = b.model(b.conv(b.op("Relu", [add], "r2"), "head", 8, 3, 3, pad=1), ["N", 3, 6, 6])
    for t in model.graph.initializer:
        if t.name == "c2.w":
            scaled = onnx.numpy_helper.to_array(t) * np.float32(scale)
            t.CopyFrom(onnx.numpy_helper.from_array(scaled, t.name))
    return model


@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_a_residual_branch_goes_whole_when_the_guard_allows_it(rng, tmp_path, scale):
    """A faint branch becomes x + c (its two convs leave the graph); a strong one fails the guard, stays."""
    model = _faint_block(rng, scale)
    np.savez(tmp_path / "calib.npz", x=f32(rng.normal(size=(300, 3, 6, 6))))
    result = egp_onnx.compress(
        model, tmp_path / "calib.npz", channels=True, sparsity=0.0, max_rel_error=0.05, latency=False
    )
    record = result.report.channels
    assert record is not None
    attempt = next(s for s in record.steps if s.branch == "add1")
    assert attempt.step == 1  # before any channel step
    layers = {n.name for n in result.model.graph.node}
    summary = compression_summary(result.report, [])
    if scale < 1:
        assert attempt.accepted and record.branches == ("add1",)
        assert "residual branches emptied: 1 (the block is x + c)" in " ".join(summary.split())
        assert not {"c1", "c2"} & layers
        assert {g.producer: g.kept for g in record.groups}["c1"] == 0
        assert attempt.macs is not None and attempt.macs < record.macs_before / 2
    else:
        assert not attempt.accepted and record.branches == () and "rel" in attempt.detail
    assert result.report.fidelity.rel_error <= 0.05
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("follows", [False, True], ids=["plain_callback", "follows_branches"])
def test_under_finetuning_a_branch_goes_only_if_the_callback_follows(follows, rng, tmp_path):
    """The faint branch that goes whole without a callback stays under one that cannot train
    ``x + c`` (no layer in its module); one that says it ``follows_branches`` is handed the
    emptied candidate. The callback starts on the original, then sees every candidate before the
    guard does.
    """
    model = _faint_block(rng, 0.01)
    np.savez(tmp_path / "calib.npz", x=f32(rng.normal(size=(300, 3, 6, 6))))

    class Recorder:
        follows_branches = follows

        def __init__(self) -> None:
            self.started: list[int] = []
            self.seen: list[dict[str, tuple[int, ...]]] = []

        def start(self, model: onnx.ModelProto) -> None:
            self.started.append(len(model.graph.initializer))

        def __call__(self, model, masks):
            self.seen.append({t.name: tuple(t.dims) for t in model.graph.initializer})
            return model

    recorder = Recorder()
    result = egp_onnx.compress(
        model, tmp_path / "calib.npz", channels=True, sparsity=0.0, max_rel_error=0.05, latency=False,
        finetune=recorder,
    )  # fmt: skip
    record = result.report.channels
    assert record is not None and recorder.started == [len(model.graph.initializer)]
    measured = [s for s in record.steps if s.top1_agreement is not None or s.rel_error is not None]
    assert len(recorder.seen) == len(measured) > 0
    if follows:
        assert record.branches == ("add1",) and record.steps[0].branch == "add1"
        assert "c1.w" not in recorder.seen[0] and "add1.constant.bias" in recorder.seen[0]
        assert not {"c1", "c2"} & {n.name for n in result.model.graph.node}
    else:
        assert record.branches == () and not any(s.branch for s in record.steps)
        assert {"c1", "c2"} <= {n.name for n in result.model.graph.node}
        assert record.removed > 0 and recorder.seen[0]["c1.w"][0] < 8  # narrowed inside the branch
    assert result.report.fidelity.rel_error <= 0.05


def test_a_failing_start_is_one_finetune_error(rng, tmp_path):
    model = _faint_block(rng, 1.0)
    np.savez(tmp_path / "calib.npz", x=f32(rng.normal(size=(40, 3, 6, 6))))

    class Broken:
        def start(self, model):
            raise RuntimeError("no such layer\nin the module")

        def __call__(self, model, masks):
            return model

    with pytest.raises(
        FinetuneError, match=r"^the finetune callback Broken's start\(\) failed: Runtime"
    ) as info:
        egp_onnx.compress(model, tmp_path / "calib.npz", channels=True, finetune=Broken(), latency=False)
    assert "\n" not in str(info.value) and "no such layer" in str(info.value)
