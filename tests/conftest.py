from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

import references  # noqa: E402  (found through the path entry above)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
#: the report's documented JSON schema
REPORT_SCHEMA = json.loads((ROOT / "docs" / "compress-report.schema.json").read_text())


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def run_ort() -> Callable[..., list[np.ndarray]]:
    """references.run_ort, the suite's one plain onnxruntime runner (optimisation off, CPU)."""
    return references.run_ort


@pytest.fixture
def runner() -> CliRunner:
    """click's runner: the command line in this process, stdout and stderr kept apart."""
    return CliRunner()


def load_npz(path) -> dict[str, np.ndarray]:
    """All arrays of an .npz, with the file closed again."""
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than 20 s; runs only with EGP_SLOW=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("EGP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set EGP_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


#: compress() as it ran before reconstruction and the default guard: plain EGP on all the
#: calibration data; a guard only when a threshold is given. Tests of the EGP algorithm itself use it.
PLAIN = {"reconstruct": False, "holdout": 0.0}


def compress_plain(*args, **kwargs):
    import egp_onnx

    guarded = kwargs.get("min_agreement") is not None or kwargs.get("max_rel_error") is not None
    plain = {k: v for k, v in PLAIN.items() if k != "holdout" or kwargs.get("eval_data") is None}
    return egp_onnx.compress(*args, **{**plain, "guard": guarded, **kwargs})  # eval data excludes a holdout
