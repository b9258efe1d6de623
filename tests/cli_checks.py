"""Checks of a command-line run that several test folders share: a refusal is one line, the
files around it are untouched, and the command line in its own process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, SAMPLES

SAMPLE = SAMPLES / "digits_resnet.onnx"
SAMPLE_CALIB = SAMPLES / "digits_calib.npz"


def digests(folder: Path) -> dict[str, str]:
    """Content digest of every file under ``folder`` (hidden temporaries included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(result, exit_code: int = 2) -> str:
    """The single stderr line of a refused run (and no traceback anywhere)."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("egp-onnx: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    return lines[0]


def cli(*args: str) -> subprocess.CompletedProcess:
    """The command line in its own process: logging and stderr exactly as a user sees them."""
    return subprocess.run(
        [sys.executable, "-m", "egp_onnx", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def compress_args(model: str | Path, calib: str | Path, out: str | Path, *extra: str) -> list[str]:
    """The arguments of `compress MODEL --calib CALIB -o OUT`, then ``extra``."""
    return ["compress", str(model), "--calib", str(calib), "-o", str(out), *extra]


def sample_args(tmp_path: Path, *extra: str) -> list[str]:
    """`compress` on the sample model at sparsity 0.5, writing tmp_path/x.onnx."""
    return compress_args(SAMPLE, SAMPLE_CALIB, tmp_path / "x.onnx", "--sparsity", "0.5", *extra)
