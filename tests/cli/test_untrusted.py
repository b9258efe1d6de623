"""Untrusted files (issue 24, classes 1 and 2): a statistics file is checked field by field against
the model, a file given twice is refused, and data that cannot be read is one line with exit code 2,
never an internal error; nothing is written and the inputs stay as they were.
"""

from __future__ import annotations

import os
import shutil
import zipfile

import numpy as np
import pytest
from cli_checks import SAMPLE, SAMPLE_CALIB, cli, digests, one_line_error
from models import toy_files

import egp_onnx
from egp_onnx.cli.main import main
from egp_onnx.errors import CalibrationError, ConfigError


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    """`egp-onnx stats` of the sample model, and its fields."""
    path = tmp_path_factory.mktemp("stats") / "s.npz"
    result = cli("stats", str(SAMPLE), "--calib", str(SAMPLE_CALIB), "-o", str(path))
    assert result.returncode == 0, result.stderr
    return path, dict(np.load(path))


def _tampered(fields, **changes):
    out = dict(fields)
    for key, change in changes.items():
        out[key] = change(fields[key]) if callable(change) else change
    return out


# Each broken field, and the words of the one-line refusal.
TAMPERED = {
    "short": ({"on_0": lambda a: a[:3]}, "counts 3 channels for block1.relu1, which has 16"),
    "long": ({"on_0": lambda a: np.concatenate([a, a])}, "counts 32 channels for block1.relu1, which has 16"),
    "above": ({"on_0": lambda a: a + 10**9}, "the ON counts of block1.relu1 lie outside [0, "),
    "negative": ({"on_0": lambda a: -1 - a}, "the ON counts of block1.relu1 lie outside [0, "),
    "fractional": ({"on_0": lambda a: a + 0.5}, "the ON counts of block1.relu1 are float64 (16,)"),
    "2-d": ({"on_0": lambda a: a[None]}, "not one integer per channel"),
    "negative total": ({"total_0": np.array(-4)}, "lie outside [0, -4]"),
    "negative samples": ({"samples": np.array(-5)}, "the sample count is -5"),
    "zero samples": ({"samples": np.array(0)}, "the sample count is 0"),
    "format array": ({"format": np.array([1])}, "field 'format' is int64 (1,), not one integer"),
    "format 2": ({"format": np.array(2)}, "statistics format 2 is not supported"),
    "float samples": ({"samples": np.array(512.0)}, "field 'samples' is float64"),
    "other model": ({"fingerprint": np.array("0" * 64)}, "computed for another model"),
    "renamed": ({"rectifiers": lambda a: np.array(["x", *a[1:]])}, "its rectifiers are not this model's"),
    "names twice": ({"rectifiers": lambda a: np.array([a[0], *a[:-1]])}, "a rectifier is listed twice"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
@pytest.mark.parametrize("command", ["analyze", "compress"])
def test_a_malformed_statistics_file_is_refused(runner, stats_file, tmp_path, case, command):
    _, fields = stats_file
    changes, words = TAMPERED[case]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **_tampered(fields, **changes))
    before = digests(tmp_path)
    args = [command, str(SAMPLE), "--stats", str(bad)]
    if command == "compress":
        args += ["--calib", str(SAMPLE_CALIB), "-o", str(tmp_path / "o.onnx"), "--no-latency"]
    line = one_line_error(runner.invoke(main, args))
    assert words in line, line
    assert digests(tmp_path) == before


def test_the_same_statistics_twice_are_refused(runner, stats_file, tmp_path):
    path, _ = stats_file
    copy = shutil.copy(path, tmp_path / "copy.npz")  # another name, the same content
    for second in (path, copy):
        args = ["analyze", str(SAMPLE), "--stats", str(path), "--stats", str(second)]
        line = one_line_error(runner.invoke(main, args))
        assert f"{second} holds the same statistics as {path}" in line


def test_statistics_files_that_are_no_statistics_are_refused(runner, tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    (tmp_path / "trunc.npz").write_bytes(SAMPLE_CALIB.read_bytes()[:300])
    np.save(tmp_path / "array.npy", np.arange(3))
    os.replace(tmp_path / "array.npy", tmp_path / "array.npz")
    for name, words in [
        ("text.npz", "text.npz is not a statistics file"),
        ("trunc.npz", "cannot read statistics file"),
        ("array.npz", "array.npz is not a statistics file"),
    ]:
        line = one_line_error(runner.invoke(main, ["analyze", str(SAMPLE), "--stats", str(tmp_path / name)]))
        assert words in line, line


def test_api_stats_takes_one_path_as_one_file(stats_file):
    path, fields = stats_file
    for given in (str(path), path, [str(path)]):
        assert egp_onnx.analyze(str(SAMPLE), stats=given).samples == int(fields["samples"])
    with pytest.raises(ConfigError, match="stats takes a path or a list of paths, got int"):
        egp_onnx.analyze(str(SAMPLE), stats=3)


def _unreadable(tmp_path, rng):
    """Calibration files that cannot be read, each with the words of its refusal."""
    good = tmp_path / "good.npz"
    np.savez(good, x=rng.standard_normal((4, 3, 6, 6)).astype(np.float32))
    (tmp_path / "trunc.npz").write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    with zipfile.ZipFile(tmp_path / "member.npz", "w") as archive:
        archive.writestr("x", b"not an array")
    with zipfile.ZipFile(tmp_path / "crc.npz", "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY garbage")
    shutil.copy(good, tmp_path / "archive.npy")
    np.save(tmp_path / "lone.npy", np.zeros((4, 3, 6, 6), np.float32))
    os.replace(tmp_path / "lone.npy", tmp_path / "lone.npz")
    os.mkfifo(tmp_path / "fifo")
    return {
        "trunc.npz": "cannot read calibration file",
        "text.npz": "text.npz is not an .npz file (neither a zip archive nor a numpy array)",
        "member.npz": "member.npz: member 'x' is not a numpy array (.npy)",
        "crc.npz": "cannot read calibration file",
        "archive.npy": "archive.npy is an .npz archive, not one array",
        "lone.npz": "lone.npz holds one array, not an .npz archive",
        "fifo": "fifo is neither a file nor a folder (a pipe or device)",
    }


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs need a POSIX system")
def test_unreadable_calibration_data_is_one_line(runner, tmp_path, rng):
    model, _ = toy_files(tmp_path, rng)
    cases = _unreadable(tmp_path, rng)
    before = digests(tmp_path)
    for name, words in cases.items():
        for command in ("analyze", "compress"):
            args = [command, model, "--calib", str(tmp_path / name)]
            if command == "compress":
                args += ["-o", str(tmp_path / "o.onnx")]
            line = one_line_error(runner.invoke(main, args))
            assert words in line, line
    # In its own process as a user runs it: the FIFO is refused, not opened (which would block).
    result = cli("analyze", model, "--calib", str(tmp_path / "fifo"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert digests(tmp_path) == before


class _ListReader:
    def __init__(self, rng, feeds=2):
        self.left = feeds
        self.rng = rng

    def get_next(self):
        self.left -= 1
        return [self.rng.standard_normal((2, 3, 6, 6)).astype(np.float32)] if self.left >= 0 else None


class _RaisingReader:
    def get_next(self):
        raise OSError("disk gone")


def test_a_reader_that_breaks_the_protocol_is_one_line(tmp_path, rng):
    model, _ = toy_files(tmp_path, rng)
    with pytest.raises(CalibrationError, match=r"_ListReader.get_next\(\) returned a list; a Calib"):
        egp_onnx.analyze(model, _ListReader(rng))
    with pytest.raises(CalibrationError, match=r"_RaisingReader.get_next\(\) failed: OSError: disk gone"):
        egp_onnx.analyze(model, _RaisingReader())


def test_a_calibration_folder_skips_hidden_files_and_names_what_it_does_not_read(tmp_path, rng):
    model, calib = toy_files(tmp_path, rng)
    folder = tmp_path / "calib"
    folder.mkdir()
    shutil.copy(calib, folder / "a.npz")
    (folder / "._a.npz").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (folder / ".DS_Store").write_bytes(b"Bud1 finder metadata")
    (folder / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    result = cli("analyze", model, "--calib", str(folder))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"egp-onnx: WARNING: {folder}: 1 image file(s) or folder(s) not read: cat.png "
        "(egp-onnx reads its .npz/.npy files only)"
    ]
    alone = egp_onnx.analyze(model, calib)
    assert egp_onnx.analyze(model, str(folder)).to_dict() == {**alone.to_dict(), "source": model}
