"""The option groups build the same configuration as the API's defaults, one field per option."""

from __future__ import annotations

from dataclasses import fields

import pytest

from egp_onnx.cli import options
from egp_onnx.cli.commands import compress_command
from egp_onnx.config import DataConfig, Settings
from egp_onnx.errors import ConfigError

REQUIRED = ["m.onnx", "--calib", "c.npz", "-o", "out.onnx"]


def params(*args: str) -> dict:
    """The values click parses from a `compress` command line (nothing runs)."""
    return compress_command.make_context("compress", [*REQUIRED, *args]).params


def test_no_options_give_the_api_defaults():
    assert options.compress_settings(params()) == Settings()
    assert options.data_config(params()) == DataConfig()


def test_every_setting_but_the_callback_name_has_an_option():
    given: dict = {}
    for group in options.COMPRESS_GROUPS:
        given.update(group.settings(params()))
    assert set(given) == {f.name for f in fields(Settings)} - {"finetune"}


def test_each_option_sets_its_field():
    parsed = params(
        "--sparsity", "0.5", "--step", "0.25", "--method", "magnitude", "--batch-size", "8", "--seed", "3",
        "--no-surgery", "--merge-tolerance", "0.01", "--holdout", "0.2", "--min-agreement", "0.9",
        "--max-rel-error", "0.1", "--no-guard", "--no-reconstruct", "--select", "obs", "--layer-cap", "0.5",
        "--no-latency", "--mean", "0.5,0.25", "--std", "2", "--workers", "2",
    )  # fmt: skip
    assert options.compress_settings(parsed) == Settings(
        sparsity=0.5, step=0.25, method="magnitude", batch_size=8, seed=3, surgery=False,
        merge_tolerance=0.01, holdout=0.2, min_agreement=0.9, max_rel_error=0.1, guard=False,
        reconstruct=False, select="obs", layer_cap=0.5, latency=False,
    )  # fmt: skip
    assert options.data_config(parsed) == DataConfig(mean=(0.5, 0.25), std=(2.0,), workers=2)


@pytest.mark.parametrize(
    ("build", "args", "message"),
    [
        (options.compress_settings, ["--step", "0"], "--step must be in (0, 1], got 0.0"),
        (options.compress_settings, ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (options.compress_settings, ["--layer-cap", "nan"], "--layer-cap must be in (0, 1], got nan"),
        (options.data_config, ["--workers", "-1"], "--workers must be at least 0, got -1"),
        (options.data_config, ["--std", "1,0"], "--std values must be non-zero"),
        (options.data_config, ["--mean", "a"], "--mean/--std take comma-separated numbers, got 'a'"),
        (options.data_config, ["--mean", "inf"], "--mean/--std take finite numbers, got 'inf'"),
    ],
)
def test_options_are_checked_with_the_messages_of_settings_and_data_config(build, args, message):
    with pytest.raises(ConfigError) as info:
        build(params(*args))
    assert str(info.value) == message


def test_finetune_options_are_checked_before_anything_loads():
    with pytest.raises(ConfigError, match="--epochs must be at least 1, got 0"):
        options.FinetuneArgs.of(params("--epochs", "0"))
    with pytest.raises(ConfigError, match="--lr must be a finite number > 0"):
        options.FinetuneArgs.of(params("--lr", "0"))
    assert options.FinetuneArgs.of(params()).callback() is None
