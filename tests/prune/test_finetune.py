"""What a finetune callback returns is checked (prune/finetune.py) before it reaches the model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cli_checks import compress_args, digests, one_line_error
from conftest import compress_plain
from models import toy_files
from onnx import numpy_helper

from egp_onnx.cli.main import main
from egp_onnx.errors import FinetuneError


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
    hook, report = f"{tmp_path / 'hooks.py'}:bad", str(tmp_path / "r.json")
    args = compress_args(model, calib, tmp_path / "o.onnx", "--finetune", hook, "--report", report)
    result = runner.invoke(main, args)
    assert "returned tensor 'w' with shape (1,)" in one_line_error(result)
    assert digests(tmp_path) == before
