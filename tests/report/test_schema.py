"""The report against its documented JSON schema (docs/compress-report.schema.json)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from cli_checks import sample_args
from click.testing import CliRunner
from conftest import REPORT_SCHEMA, SAMPLES, compress_plain

from egp_onnx.cli.main import main

MODEL = SAMPLES / "digits_resnet.onnx"
CALIB = SAMPLES / "digits_calib.npz"


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--no-latency", "--no-surgery"],
        ["--holdout", "0.25", "--max-rel-error", "0.9"],
        ["--no-latency", "--quantize", "int8"],
        ["--no-latency", "--channels", "--sparsity", "0"],
    ],
)
def test_reports_validate_against_documented_schema(extra, tmp_path):
    report_path = tmp_path / "r.json"
    result = CliRunner().invoke(main, sample_args(tmp_path, "--report", str(report_path), *extra))
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["schema_version"] == 2


def test_schema_rejects_drift(tmp_path):
    """The schema is strict: a renamed field would not pass."""
    report = compress_plain(MODEL, CALIB, sparsity=0.3, latency=False).report.to_dict()
    jsonschema.validate(report, REPORT_SCHEMA)
    report["model"]["depth"] = report["model"].pop("depth_after")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, REPORT_SCHEMA)
