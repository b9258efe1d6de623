"""The statistics model's probes: which are fast, which outputs leave the graph, on the models' shapes."""

from __future__ import annotations

import onnx
import pytest
from models import mixed_ranks, residual_block

from egp_onnx.calibrate.probes import probes, statistics_model
from egp_onnx.graph.rectifiers import find_rectifiers
from egp_onnx.load.model import prepare_model


@pytest.mark.parametrize("fast", [True, False])
def test_statistics_model_outputs_only_counts(fast, rng):
    model = prepare_model(residual_block(rng))
    sites = find_rectifiers(model)
    stats = statistics_model(model, sites, fast=fast)
    onnx.checker.check_model(stats)
    outputs = [o.name for o in stats.graph.output]
    # fast probes: the (N, C, 1, 1) ON fractions of every site in one output (all rank 4);
    # general probes: a count and a size per site
    assert len(outputs) == (1 if fast else 2 * len(sites))
    names = "egp_on_fraction__4" if fast else ("egp_on_count__", "egp_size__")
    assert all(o.startswith(names) for o in outputs)
    assert [p.fast for p in probes(model, sites)] == [True] * len(sites)
    # the user's model is not touched
    assert [o.name for o in model.graph.output] == ["y"]


def test_fast_probes_of_each_rank_leave_in_one_output(rng):
    model = prepare_model(mixed_ranks(rng))
    sites = find_rectifiers(model)
    assert [p.fast for p in probes(model, sites)] == [True, True, False]
    stats = statistics_model(model, sites)
    outputs = {o.name: o for o in stats.graph.output}
    assert sorted(outputs) == ["egp_on_count__2", "egp_on_fraction__3", "egp_on_fraction__4", "egp_size__2"]
    dims = outputs["egp_on_fraction__3"].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [5, 1]
