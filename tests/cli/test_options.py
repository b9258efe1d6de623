"""The option groups build the same configuration as the API's defaults, one field per option; every
option given bad values is refused in one line, with no traceback and nothing written."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from cli_checks import SAMPLE, SAMPLE_CALIB, digests
from click.testing import CliRunner
from models import inputs, toy_files

from egp_onnx.cli import options
from egp_onnx.cli.commands import compress_command
from egp_onnx.cli.main import main
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
        "--no-latency", "--mean", "0.5,0.25", "--std", "2", "--workers", "2", "--quantize", "int8",
        "--scheduler", "local:2", "--min-iou", "0.8", "--map-threshold", "0.5",
    )  # fmt: skip
    assert options.compress_settings(parsed) == Settings(
        sparsity=0.5, step=0.25, method="magnitude", batch_size=8, seed=3, surgery=False,
        merge_tolerance=0.01, holdout=0.2, min_agreement=0.9, max_rel_error=0.1, guard=False,
        reconstruct=False, select="obs", layer_cap=0.5, latency=False, quantize="int8", min_iou=0.8,
        map_threshold=0.5,
    )  # fmt: skip
    assert options.data_config(parsed) == DataConfig(
        mean=(0.5, 0.25), std=(2.0,), workers=2, scheduler="local:2"
    )


@pytest.mark.parametrize(
    ("args", "sensitivity"), [([], None), (["--sensitivity"], True), (["--no-sensitivity"], False)]
)
def test_the_sensitivity_caps_are_automatic_unless_forced(args, sensitivity):
    assert options.compress_settings(params(*args)).sensitivity is sensitivity


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
        "--scheduler": [["--scheduler", v] for v in ("local:0", "local:x", "", " ")],
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
        "--eval-unseen": [["--eval-unseen"]],  # without --eval
        "--min-agreement": [["--min-agreement", v] for v in ("nan", "-0.5", "1.5")],
        "--max-rel-error": [["--max-rel-error", v] for v in ("nan", "-1", "inf")],
        "--min-iou": [["--min-iou", v] for v in ("nan", "-0.1", "1.5", "abc")],
        "--map-threshold": [["--map-threshold", v] for v in ("nan", "0", "1", "-0.3", "inf", "abc")],
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
        "--distill": [["--distill", v] for v in ("nan", "-0.1", "1.5", "abc", "0.5")],  # 0.5: alone
        "--temperature": [["--temperature", v] for v in ("nan", "0", "-1", "inf", "2")],  # 2: no --distill
        "--merge-tolerance": [["--merge-tolerance", v] for v in ("nan", "-1", "inf")],
        "--select": [["--select", "foo"], ["--select", "obs", "--no-reconstruct"]],
        "--quantize": [["--quantize", v] for v in ("int4", "INT8", "")],
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
