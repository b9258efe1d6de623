"""Finetuning by distillation on the original's outputs (integrations/distill.py, issue 22)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from cli_checks import one_line_error, sample_args
from conftest import SAMPLES, load_npz
from references import run_ort

torch = pytest.importorskip("torch", reason="needs the optional torch extra: pip install 'egp-onnx[torch]'")

from egp_onnx.errors import ConfigError, FinetuneError  # noqa: E402
from egp_onnx.graph.weights import replace_tensors  # noqa: E402
from egp_onnx.integrations.distill import distillation_loss, finetune_loss, teacher_logits  # noqa: E402
from egp_onnx.integrations.torch import ClassificationFinetune  # noqa: E402
from egp_onnx.load.model import load_model  # noqa: E402

sys.path.insert(0, str(SAMPLES))
from digits_torch import factory  # noqa: E402

MODEL = SAMPLES / "digits_resnet.onnx"


def test_the_teacher_is_onnxruntime_on_the_original():
    model = load_model(MODEL)
    inputs = load_npz(SAMPLES / "digits_train.npz")["input"][:100]
    want = run_ort(model, {"input": inputs})[0]
    # 7 does not divide 100: the last batch is short
    np.testing.assert_allclose(teacher_logits(model, inputs, batch_size=7), want, rtol=1e-5, atol=1e-6)
    finetune = ClassificationFinetune(factory(), (inputs, None), distill=1.0)
    finetune.start(model)
    assert finetune.teacher is not None and finetune.teacher.dtype == torch.float32
    np.testing.assert_allclose(finetune.teacher.numpy(), want, rtol=1e-5, atol=1e-6)
    # no teacher without distillation: start() runs nothing
    labelled = ClassificationFinetune(factory(), (inputs, np.zeros(100, np.int64)))
    labelled.start(model)
    assert labelled.teacher is None


def test_the_distillation_loss_is_hintons():
    rng = np.random.default_rng(0)
    student, teacher = (torch.from_numpy(rng.normal(size=(6, 5)).astype(np.float32)) for _ in range(2))
    for t in (1.0, 3.0):
        p = torch.softmax(teacher / t, 1)
        want = (p * (torch.log(p) - torch.log_softmax(student / t, 1))).sum(1).mean() * t**2
        assert float(distillation_loss(student, teacher, t)) == pytest.approx(float(want), rel=1e-5)
        # zero at the teacher, also shifted by a constant per row (softmax does not see it)
        assert float(distillation_loss(teacher + 2.0, teacher, t)) == pytest.approx(0.0, abs=1e-6)
    labels = torch.from_numpy(rng.integers(0, 5, 6))
    ce = torch.nn.functional.cross_entropy(student, labels)
    mixed = finetune_loss(student, labels, teacher, 0.25, 2.0)
    assert float(mixed) == pytest.approx(float(0.75 * ce + 0.25 * distillation_loss(student, teacher, 2.0)))
    with pytest.raises(FinetuneError, match="class logits"):
        finetune_loss(student, None, teacher[:, :3], 1.0, 1.0)


def _agreement_after_a_step(distill: float) -> float:
    """One Adam step (lr 3e-4, 256 samples) from the original itself, on labels unlike its answers."""
    model = load_model(MODEL)
    train, test = load_npz(SAMPLES / "digits_train.npz"), load_npz(SAMPLES / "digits_test.npz")
    # shuffled labels: cross-entropy has something to move away from the original's answers
    labels = np.random.default_rng(0).permutation(train["labels"])[:256]
    finetune = ClassificationFinetune(
        factory(), (train["input"][:256], labels), lr=3e-4, batch_size=256, distill=distill
    )
    finetune.start(model)
    values = finetune(model, {})  # nothing pruned: no masks to hold
    tuned = run_ort(replace_tensors(model, values), {"input": test["input"]})[0].argmax(1)
    return float((tuned == run_ort(model, {"input": test["input"]})[0].argmax(1)).mean())


def test_distillation_keeps_the_original_answers_where_cross_entropy_does_not():
    assert _agreement_after_a_step(1.0) == 1.0
    # the same step on the labels changes answers (measured 0.996 on the 497 held-out digits)
    assert _agreement_after_a_step(0.0) < 1.0


def test_distillation_needs_no_labels(tmp_path):
    data = load_npz(SAMPLES / "digits_train.npz")
    np.savez(tmp_path / "unlabelled.npz", input=data["input"][:64])
    finetune = ClassificationFinetune(factory(), tmp_path / "unlabelled.npz", distill=1.0)
    assert finetune.labels is None
    model = load_model(MODEL)
    finetune.start(model)
    values = finetune(model, {})
    assert values and all(np.isfinite(v).all() for v in values.values())
    with pytest.raises(KeyError):  # the CLI turns this into a one-line --train error
        ClassificationFinetune(factory(), tmp_path / "unlabelled.npz", distill=0.5)
    with pytest.raises(ConfigError, match="needs labels"):
        ClassificationFinetune(factory(), (data["input"], None), distill=0.5)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        ClassificationFinetune(factory(), (data["input"], data["labels"]), distill=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        ClassificationFinetune(factory(), (data["input"], data["labels"]), distill=1.0, temperature=0.0)


TORCH = [
    "--torch-model", f"{SAMPLES / 'digits_torch.py'}:factory", "--train", str(SAMPLES / "digits_train.npz")
]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([*TORCH, "--distill", "1.5"], "--distill must be in [0, 1], got 1.5"),
        ([*TORCH, "--distill", "-0.1"], "--distill must be in [0, 1], got -0.1"),
        ([*TORCH, "--distill", "nan"], "--distill must be in [0, 1], got nan"),
        ([*TORCH, "--distill", "1", "--temperature", "0"], "--temperature must be a finite number > 0"),
        ([*TORCH, "--temperature", "2"], "--temperature is used with --distill"),
        (["--distill", "0.5"], "--distill and --temperature are used with --torch-model"),
        (["--freeze-bn"], "--freeze-bn is used with --torch-model"),
    ],
)
def test_bad_distillation_options_are_one_line(extra, message, runner, tmp_path):
    from egp_onnx.cli.main import main

    line = one_line_error(runner.invoke(main, sample_args(tmp_path, *extra)))
    assert message in line
    assert not (tmp_path / "x.onnx").exists()


def test_an_unlabelled_train_file_without_distill_one_is_one_line(runner, tmp_path):
    from egp_onnx.cli.main import main

    np.savez(tmp_path / "unlabelled.npz", input=load_npz(SAMPLES / "digits_train.npz")["input"][:64])
    torch_model = ["--torch-model", f"{SAMPLES / 'digits_torch.py'}:factory"]
    extra = [*torch_model, "--train", str(tmp_path / "unlabelled.npz"), "--distill", "0.5"]
    line = one_line_error(runner.invoke(main, sample_args(tmp_path, *extra)))
    assert "needs an .npz with an input array and 'labels' (or --distill 1)" in line


def test_distill_one_on_an_unlabelled_train_file_from_the_command_line(runner, tmp_path):
    import json

    from egp_onnx.cli.main import main

    np.savez(tmp_path / "unlabelled.npz", input=load_npz(SAMPLES / "digits_train.npz")["input"][:256])
    torch_model = ["--torch-model", f"{SAMPLES / 'digits_torch.py'}:factory", "--lr", "3e-4"]
    extra = [
        *torch_model,
        "--train",
        str(tmp_path / "unlabelled.npz"),
        "--distill",
        "1",
        "--temperature",
        "2",
    ]
    result = runner.invoke(
        main, sample_args(tmp_path, *extra, "--no-latency", "--report", str(tmp_path / "r.json"))
    )
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["finetune"] == "ClassificationFinetune"
    assert report["steps"] and all(step["finetuned"] for step in report["steps"])


def _batchnorm_statistics(model) -> dict[str, np.ndarray]:
    from egp_onnx.graph.weights import tensor_values

    values = tensor_values(model)
    return {
        name: values[name]
        for node in model.graph.node
        if node.op_type == "BatchNormalization"
        for name in node.input[3:5]
    }


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_batchnorm_keeps_the_onnx_models_running_statistics(freeze):
    mnist_torch = pytest.importorskip("mnist_torch")
    model = load_model(SAMPLES / "mnist_resnet.onnx")
    data = load_npz(SAMPLES / "mnist_calib.npz")
    before = _batchnorm_statistics(model)
    assert before  # the MNIST sample keeps its BatchNormalization nodes
    finetune = ClassificationFinetune(
        mnist_torch.factory(), (data["image"][:128], data["labels"][:128]), lr=1e-3, freeze_bn=freeze
    )
    finetune.start(model)
    after = _batchnorm_statistics(replace_tensors(model, finetune(model, {})))
    moved = [name for name in before if not np.array_equal(before[name], after[name])]
    assert (not moved) if freeze else len(moved) == len(before), moved  # training mode moves them all
    assert finetune.module.training is False  # left in eval mode either way
