"""The PyTorch bridge and the finetune loop (run in CI, where the torch extra is installed)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import ROOT, SAMPLES, compress_plain, load_npz
from references import run_ort

torch = pytest.importorskip("torch", reason="needs the optional torch extra: pip install 'egp-onnx[torch]'")
from torch import nn  # noqa: E402

import egp_onnx  # noqa: E402
from egp_onnx.errors import FinetuneError, MappingError  # noqa: E402
from egp_onnx.graph.channels import channel_groups, emptied_branches, residual_branches  # noqa: E402
from egp_onnx.graph.weights import replace_tensors, tensor_values  # noqa: E402
from egp_onnx.integrations.torch import (  # noqa: E402
    BranchSwap,
    ClassificationFinetune,
    apply_masks,
    branch_ends,
    export_onnx,
    load_onnx_weights,
    map_initializers,
    narrow_module,
    onnx_weights,
    present_bindings,
    remove_masks,
)
from egp_onnx.load.model import load_model  # noqa: E402
from egp_onnx.surgery.narrow import narrowed, without_branch  # noqa: E402

sys.path.insert(0, str(SAMPLES))


class Small(nn.Module):
    """x(N,2,6,6) -> Conv BN ReLU -> Conv(bias) ReLU -> Flatten -> Linear ReLU -> Linear"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3)
        self.fc1 = nn.Linear(3 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def trained_small(seed: int) -> Small:
    torch.manual_seed(seed)
    module = Small()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding matters
        module.bn1.running_mean.uniform_(-0.5, 0.5)
        module.bn1.running_var.uniform_(0.5, 2.0)
        module.bn1.weight.uniform_(0.5, 1.5)
        module.bn1.bias.uniform_(-0.2, 0.2)
    return module.eval()


@pytest.mark.parametrize("fold", [True, False], ids=["bn_folded", "bn_unfolded"])
def test_torch_mapping_round_trips_through_export(fold, tmp_path):
    source = trained_small(0)
    x = np.random.default_rng(0).normal(size=(4, 2, 6, 6)).astype(np.float32)
    model = export_onnx(
        source, torch.from_numpy(x), tmp_path / "small.onnx", ["x"], ["y"], fold_batchnorm=fold
    )
    ops = {n.op_type for n in model.graph.node}
    assert ("BatchNormalization" in ops) != fold
    fresh = trained_small(1)  # other weights and BN statistics
    bindings = map_initializers(fresh, model)
    assert [b.kind for b in bindings if b.kind != "bn"] == ["conv", "conv", "linear", "linear"]
    assert (bindings[0].folded_bn == "bn1") == fold
    load_onnx_weights(fresh, model, bindings)
    with torch.no_grad():
        got = fresh(torch.from_numpy(x)).numpy()
        want = source(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # and back: the module's parameters, folded again where they were, equal the ONNX tensors
    values = onnx_weights(fresh, bindings)
    original = tensor_values(model)
    for name, value in values.items():
        np.testing.assert_allclose(value, original[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        run_ort(replace_tensors(model, values), {"x": x})[0],
        run_ort(model, {"x": x})[0],
        rtol=1e-5,
        atol=1e-6,
    )


def test_torch_masks_survive_a_training_step(tmp_path):
    module = trained_small(0)
    x = torch.randn(8, 2, 6, 6)
    model = export_onnx(module, x, tmp_path / "m.onnx", ["x"], ["y"])
    bindings = map_initializers(module, model)
    rng = np.random.default_rng(0)
    masks = {
        b.tensors["weight"]: rng.random(tensor_values(model)[b.tensors["weight"]].shape) > 0.5
        for b in bindings
        if b.kind != "bn"
    }
    hooked = apply_masks(module, bindings, masks)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    module.train()
    for _ in range(3):
        optimizer.zero_grad()
        module(x).square().mean().backward()
        optimizer.step()
    remove_masks(hooked)
    after = onnx_weights(module, bindings)
    for name, mask in masks.items():
        assert not after[name][~mask].any(), f"{name}: pruned weights stayed zero"
        assert after[name][mask].all()


def test_torch_ambiguous_mapping_is_refused(tmp_path):
    module = trained_small(0)
    model = export_onnx(module, torch.randn(1, 2, 6, 6), tmp_path / "m.onnx", ["x"], ["y"])
    other = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Linear(3, 3))
    with pytest.raises(MappingError):
        map_initializers(other, model)


def test_torch_module_import_message_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n import egp_onnx.integrations.torch\nexcept ImportError as e:\n print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "pip install 'egp-onnx[torch]'" in out.stdout


def test_finetune_callback_beats_no_finetune_at_equal_sparsity():
    from digits_torch import factory

    test = SAMPLES / "digits_test.npz"
    common = dict(sparsity=0.7, eval_data=test, latency=False)
    plain = compress_plain(SAMPLES / "digits_resnet.onnx", SAMPLES / "digits_calib.npz", **common).report
    finetune = ClassificationFinetune(factory(), SAMPLES / "digits_train.npz", epochs=2, lr=2e-3)
    result = compress_plain(
        SAMPLES / "digits_resnet.onnx", SAMPLES / "digits_calib.npz", finetune=finetune, **common
    )
    tuned = result.report
    assert tuned.model.sparsity == pytest.approx(plain.model.sparsity) == pytest.approx(0.7, abs=1e-4)
    assert all(step.finetuned for step in tuned.steps)
    assert tuned.fidelity.accuracy_after > plain.fidelity.accuracy_after + 0.3
    assert tuned.fidelity.accuracy_after > 0.9
    # the accuracy the report gives is what onnxruntime measures on the written model
    data = load_npz(test)
    accuracy = float((run_ort(result.model, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean())
    assert accuracy == pytest.approx(tuned.fidelity.accuracy_after)


def test_finetune_returning_a_bad_value_is_a_clear_error(tmp_path):
    def broken(model, masks):
        return {"no.such.tensor": np.zeros(3, np.float32)}

    with pytest.raises(egp_onnx.EgpError, match="no.such.tensor is not a tensor of the model"):
        compress_plain(
            SAMPLES / "digits_resnet.onnx",
            SAMPLES / "digits_calib.npz",
            sparsity=0.5,
            finetune=broken,
            latency=False,
        )


def test_finetune_options_on_the_command_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from egp_onnx.cli.main import main

    (tmp_path / "my_hooks.py").write_text(
        "calls = []\ndef keep(model, masks):\n    calls.append(sorted(masks))\n    return model\n"
    )
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    base = [
        "compress",
        str(SAMPLES / "digits_resnet.onnx"),
        "--calib",
        str(SAMPLES / "digits_calib.npz"),
        "--sparsity",
        "0.5",
        "--no-latency",
        "--report",
    ]
    user = runner.invoke(main, [*base, "r1.json", "-o", "m1.onnx", "--finetune", "my_hooks:keep"])
    assert user.exit_code == 0, user.output + user.stderr
    import my_hooks

    assert len(my_hooks.calls) == 1 and "block1.conv1.weight" in my_hooks.calls[0]
    ready = runner.invoke(
        main,
        [
            *base,
            "r2.json",
            "-o",
            "m2.onnx",
            "--torch-model",
            f"{SAMPLES / 'digits_torch.py'}:factory",
            "--train",
            str(SAMPLES / "digits_train.npz"),
            "--epochs",
            "1",
        ],
    )
    assert ready.exit_code == 0, ready.output + ready.stderr
    import json

    report = json.loads((tmp_path / "r2.json").read_text())
    assert report["settings"]["finetune"] == "ClassificationFinetune"
    assert all(step["finetuned"] for step in report["steps"])
    missing = runner.invoke(main, [*base, "r3.json", "-o", "m3.onnx", "--torch-model", "my_hooks:keep"])
    assert missing.exit_code == 2 and "--train" in missing.stderr
    wrong = runner.invoke(main, [*base, "r3.json", "-o", "m3.onnx", "--finetune", "my_hooks:nothing"])
    assert wrong.exit_code == 2 and "has no attribute nothing" in wrong.stderr


@pytest.mark.parametrize("fold", [True, False], ids=["bn_folded", "bn_unfolded"])
def test_torch_exported_sample_compresses(fold, tmp_path):
    """What the TorchScript exporter writes (Identity/Constant nodes, folded or unfolded BN) goes through."""
    from digits_torch import factory

    calib = SAMPLES / "digits_calib.npz"
    x = torch.from_numpy(load_npz(calib)["input"][:4])
    path = tmp_path / "exported.onnx"
    export_onnx(factory(), x, path, ["input"], ["logits"], fold_batchnorm=fold)
    same = compress_plain(path, calib, sparsity=0.0, eval_data=SAMPLES / "digits_test.npz", latency=False)
    assert same.report.fidelity.rel_error < 1e-5 and same.report.fidelity.top1_agreement == 1.0
    half = compress_plain(path, calib, sparsity=0.5, eval_data=SAMPLES / "digits_test.npz", latency=False)
    onnx.checker.check_model(half.model, full_check=True)
    assert len(half.report.layers) == 8
    assert half.report.model.depth_after < half.report.model.depth_before
    assert half.report.fidelity.accuracy_after > 0.95


@pytest.mark.parametrize("fold", [True, False], ids=["bn_folded", "bn_unfolded"])
def test_narrow_module_computes_what_the_narrowed_model_computes(fold, tmp_path):
    """Channels cut out of conv1 (BN too), conv2 (the Flatten's 16 columns each) and fc1.

    The module, bound to the original and resized to the narrowed model, gives onnxruntime's
    outputs of that model; a kernel of another size is a one-line FinetuneError.
    """
    source = trained_small(0)
    x = np.random.default_rng(0).normal(size=(4, 2, 6, 6)).astype(np.float32)
    path = tmp_path / "small.onnx"
    export_onnx(source, torch.from_numpy(x), path, ["x"], ["y"], fold_batchnorm=fold)
    model = load_model(path)  # shape inference: the Flatten's channel count
    groups, _ = channel_groups(model)
    assert sorted(g.channels for g in groups) == [3, 4, 8]
    cut = {g.producer: np.array({4: [0, 2], 3: [1], 8: [3, 4, 7]}[g.channels]) for g in groups}
    narrow = narrowed(model, groups, cut)
    module = trained_small(1)
    bindings = map_initializers(module, model)
    narrow_module(module, narrow, bindings)
    load_onnx_weights(module, narrow, bindings)
    assert (module.conv1.out_channels, module.conv2.in_channels, module.conv2.out_channels) == (2, 2, 2)
    assert (module.bn1.num_features, module.fc1.in_features, module.fc1.out_features) == (2, 32, 5)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run_ort(narrow, {"x": x})[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, run_ort(model, {"x": x})[0], atol=1e-3)  # the cut changed the outputs
    values = onnx_weights(module, bindings)  # and back, folded where it was
    back = run_ort(replace_tensors(narrow, values), {"x": x})[0]
    np.testing.assert_allclose(back, got, rtol=1e-4, atol=1e-5)
    other = Small()
    other.conv2 = nn.Conv2d(4, 3, 1)  # a 1x1 kernel where the model has 3x3
    with pytest.raises(FinetuneError, match=r"only channel counts may change"):
        narrow_module(other, narrow, bindings)


def test_mnist_factory_binds_to_the_model_compress_prepares():
    """The sample's BatchNormalizations stay nodes: none is taken as folded into a conv.

    Prepared, the graph lists a shortcut's conv between a block's conv1 and its bn1; the mapping
    once folded bn1 into conv1 there and failed (the README's MNIST finetune command).
    """
    from mnist_torch import MnistResNet, factory

    model = load_model(SAMPLES / "mnist_resnet.onnx")
    order = [n.name for n in model.graph.node if n.op_type in ("Conv", "BatchNormalization")]
    assert order.index("/stage1/stage1.0/down/down.0/Conv") < order.index(
        "/stage1/stage1.0/bn1/BatchNormalization"
    )
    bindings = map_initializers(factory(), model)
    assert not any(b.folded_bn for b in bindings) and sum(b.kind == "bn" for b in bindings) == 16
    fresh = MnistResNet()
    load_onnx_weights(fresh, model, bindings)
    x = load_npz(SAMPLES / "mnist_calib.npz")["image"][:4]
    with torch.no_grad():
        got = fresh.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run_ort(model, {"image": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("sample", "add", "key"),
    [("digits", "block2.add", "input"), ("mnist", "/stage1/stage1.0/Add", "image")],
    ids=["bn_folded", "bn_nodes"],
)
def test_an_emptied_branch_leaves_the_module_and_comes_back(sample, add, key):
    """A block emptied into ``x + c`` (its stride-2 branch; the shortcut a projection): the module,
    its branch swapped out, computes what onnxruntime does with the model; swapped back, the original.
    """
    factory = __import__(f"{sample}_torch").factory
    model = load_model(SAMPLES / f"{sample}_resnet.onnx")
    branch = max((b for b in residual_branches(model) if b.add == add), key=lambda b: len(b.layers))
    constant = np.linspace(-0.5, 0.5, branch.channels)
    cut = without_branch(model, branch, constant)
    assert [(e.add, e.operand) for e in emptied_branches(model, cut)] == [(add, branch.operand)]
    module = factory()
    bindings = map_initializers(module, model)
    ends = branch_ends(model, cut, bindings)
    present = present_bindings(tensor_values(cut), bindings)
    assert len(ends) == 1 and len(bindings) - len(present) >= 2  # the branch's two convs at least
    swap = BranchSwap(module)
    swap.apply(tensor_values(cut), ends, [b for b in bindings if b not in present])
    load_onnx_weights(module, cut, present)
    x = load_npz(SAMPLES / f"{sample}_calib.npz")[key][:8]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run_ort(cut, {key: x})[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, run_ort(model, {key: x})[0], atol=1e-2)  # the branch mattered
    np.testing.assert_allclose(swap.constants(ends)[ends[0].constant], constant, rtol=1e-6)
    swap.apply(tensor_values(model), [], [])  # the branch back: a candidate the guard rejected
    load_onnx_weights(module, model, bindings)
    with torch.no_grad():
        back = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(back, run_ort(model, {key: x})[0], rtol=1e-4, atol=1e-4)


def test_channels_with_a_torch_finetune_on_the_digits_sample():
    """``--channels`` with the ready callback: each candidate is finetuned, then judged.

    Branches are emptied too (the callback follows them). Every value the callback returns is
    what its module (resized, branches swapped out) computes, to float tolerance, and the weights
    the masks hold stay exactly zero; the weight steps after the channel stage are finetuned too.
    """
    from digits_torch import factory

    train = load_npz(SAMPLES / "digits_train.npz")

    class Checked(ClassificationFinetune):
        def __call__(self, model, masks):
            values = super().__call__(model, masks)
            x = self.inputs[:16]
            with torch.no_grad():
                want = self.module(x).numpy()
            got = run_ort(replace_tensors(model, values), {"input": x.numpy()})[0]
            self.calls.append((np.abs(got - want).max(), model, masks, values))
            return values

    callback = Checked(factory(), (train["input"][:300], train["labels"][:300]), epochs=1, lr=3e-4)
    callback.calls = []
    result = compress_plain(
        SAMPLES / "digits_resnet.onnx",
        SAMPLES / "digits_calib.npz",
        channels=True,
        sparsity=0.3,
        min_agreement=0.9,
        eval_data=SAMPLES / "digits_test.npz",
        finetune=callback,
        latency=False,
    )
    record = result.report.channels
    assert record is not None and record.removed > 0 and record.branches  # it follows branches
    widths = {tuple(t.dims) for _, model, _, _ in callback.calls for t in model.graph.initializer}
    original = {tuple(t.dims) for t in load_model(SAMPLES / "digits_resnet.onnx").graph.initializer}
    assert widths - original, "some candidate the callback trained was narrower than the original"
    for gap, _, masks, values in callback.calls:
        assert gap < 1e-4
        for name, mask in masks.items():
            assert not values[name][~mask].any(), f"{name}: a masked weight moved"
    assert any((~m).any() for _, _, masks, _ in callback.calls for m in masks.values())  # weight steps
    assert result.report.steps and all(step.finetuned for step in result.report.steps)
    assert result.report.fidelity.accuracy_after > 0.9
    onnx.checker.check_model(result.model, full_check=True)
