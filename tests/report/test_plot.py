"""--plot (report/plot.py): a PNG of the run."""

from __future__ import annotations

import pytest
from cli_checks import sample_args
from click.testing import CliRunner
from conftest import SAMPLES

from egp_onnx.cli.main import main

TEST = SAMPLES / "digits_test.npz"


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the optional matplotlib extra")
    plot = tmp_path / "run.png"
    result = CliRunner().invoke(
        main, sample_args(tmp_path, "--eval", str(TEST), "--plot", str(plot), "--no-latency")
    )
    assert result.exit_code == 0, result.output
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert str(plot) in result.output
