"""Statistics files: written, read back and merged; refused for another model or another format."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import single_conv

from egp_onnx.entropy import ChannelCounts, Statistics
from egp_onnx.errors import CalibrationError
from egp_onnx.load.model import prepare_model
from egp_onnx.load.stats_file import load_statistics, model_fingerprint, statistics_bytes


def _stats(on: list[int], total: int, samples: int) -> Statistics:
    counts = {"relu": ChannelCounts(np.array(on), total), "other": ChannelCounts(np.array([1]), 2)}
    return Statistics(counts, samples)


def test_files_read_back_and_merge_as_the_counts_do(tmp_path, rng):
    fingerprint = model_fingerprint(prepare_model(single_conv(rng)))
    first, second = _stats([0, 3, 5], 5, 2), _stats([1, 1, 4], 6, 3)
    for name, stats in (("a.npz", first), ("b.npz", second)):
        (tmp_path / name).write_bytes(statistics_bytes(stats, fingerprint))
    alone = load_statistics([tmp_path / "a.npz"], fingerprint)
    assert alone.samples == 2 and sorted(alone.counts) == ["other", "relu"]
    np.testing.assert_array_equal(alone.counts["relu"].on, [0, 3, 5])
    merged = load_statistics([tmp_path / "a.npz", tmp_path / "b.npz"], fingerprint)
    expected = first.merged(second)
    assert merged.samples == expected.samples == 5
    for name, counts in expected.counts.items():
        np.testing.assert_array_equal(merged.counts[name].on, counts.on)
        assert merged.counts[name].total == counts.total == (11 if name == "relu" else 4)
    assert merged.counts["relu"].on.dtype == np.int64


def test_the_fingerprint_follows_the_weights_not_the_inferred_shapes(rng):
    model = prepare_model(single_conv(rng))
    other = prepare_model(single_conv(np.random.default_rng(5)))
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    assert len(model.graph.value_info) > len(bare.graph.value_info)
    assert model_fingerprint(model) == model_fingerprint(bare) != model_fingerprint(other)


def test_files_of_another_model_or_not_statistics_are_refused(tmp_path):
    (tmp_path / "s.npz").write_bytes(statistics_bytes(_stats([1], 1, 1), "a" * 64))
    with pytest.raises(CalibrationError, match="another model"):
        load_statistics([tmp_path / "s.npz"], "b" * 64)
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(CalibrationError, match="not a statistics file"):
        load_statistics([tmp_path / "plain.npz"], "a" * 64)
    with pytest.raises(CalibrationError, match="not found"):
        load_statistics([tmp_path / "missing.npz"], "a" * 64)
    with pytest.raises(CalibrationError, match="no statistics files"):
        load_statistics([], "a" * 64)
