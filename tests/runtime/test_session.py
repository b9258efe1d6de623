"""Sessions: each preset's options, weights from memory, no reference kept to them, and
onnxruntime's log lines and profile dumps kept out of the user's way."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ROOT
from models import inputs, residual_block, single_conv
from references import run_ort, spins

from egp_onnx.errors import CalibrationError, ModelError
from egp_onnx.graph.weights import split_weights
from egp_onnx.load.model import prepare_model
from egp_onnx.runtime.session import (
    MEASURE,
    SEGMENTS,
    SHRINK_ARENA,
    STATISTICS,
    SessionPreset,
    make_session,
    run_session,
)


def _preset(optimize: bool) -> SessionPreset:
    """onnxruntime's own defaults, with the graph optimised or not."""
    return SessionPreset(optimize=optimize, lean=False, spinning=True)


PRIORITY, DEFAULT = ort.ExecutionOrder.PRIORITY_BASED, ort.ExecutionOrder.DEFAULT


@pytest.mark.parametrize(
    ("preset", "mem_pattern", "spinning", "order"),
    [
        (STATISTICS, False, True, PRIORITY),
        (SEGMENTS, False, False, PRIORITY),
        (MEASURE, True, False, DEFAULT),
    ],
    ids=["statistics", "segments", "measure"],
)
def test_each_preset_builds_its_session_options(preset, mem_pattern, spinning, order, rng):
    """x(N,3,6,6) -> Conv Relu -> y (single_conv): every preset optimises; lean, spinning, order differ.

    The graphs that read outputs off inner tensors (statistics probes, segments) run in priority
    order, each probe as soon as its tensor exists; a measured model in onnxruntime's default order.
    """
    session = make_session(prepare_model(single_conv(rng)), preset, threads=1)
    options = session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.enable_mem_pattern is mem_pattern
    assert spins(session) is spinning
    assert options.execution_order == order
    assert options.intra_op_num_threads == 1
    assert options.log_severity_level == 4  # FATAL: a failed node raises; its ERROR line would leak
    assert options.get_session_config_entry("session.use_device_allocator_for_initializers") == "1"


def test_a_preset_without_optimisation_runs_the_graph_as_it_is(rng):
    session = make_session(prepare_model(single_conv(rng)), _preset(False))
    options = session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.enable_mem_pattern and spins(session)


def test_a_rejected_batch_is_one_calibration_error(rng):
    session = make_session(prepare_model(single_conv(rng)), MEASURE)
    # One line up to the end. Matched inside raises: an ExceptionInfo bound here would keep this
    # frame and its session in a reference cycle, which a later test's forked child could collect.
    with pytest.raises(
        CalibrationError, match=r"^onnxruntime rejected a batch \(x \(2, 5, 6, 6\)\): [^\n]+\Z"
    ):
        run_session(session, None, {"x": inputs(rng, 2, (5, 6, 6))})


def test_sessions_take_weights_from_memory_with_the_same_results(rng):
    """
    x(N,4,6,6) -> Conv Relu Conv Relu Conv Add(+proj) Relu -> y (residual_block): weights as
    in-memory stubs vs inline.
    """
    model = prepare_model(residual_block(rng))
    stubbed, values = split_weights(model)
    big = [t.name for t in model.graph.initializer if np.prod(t.dims) > 64]
    assert big and sorted(values) == sorted(big)
    assert all(not t.raw_data and not t.float_data for t in stubbed.graph.initializer if t.name in values)
    assert stubbed.ByteSize() < model.ByteSize() / 2
    x = inputs(rng, 6, (4, 6, 6))
    for optimize in (False, True):
        want = run_ort(model, {"x": x}, optimize=optimize)[0]
        np.testing.assert_array_equal(make_session(model, _preset(optimize)).run(None, {"x": x})[0], want)
        from_stubs = make_session(stubbed, _preset(optimize), weights=values)
        np.testing.assert_array_equal(from_stubs.run(None, {"x": x})[0], want)
    with pytest.raises(ModelError, match="no values"):
        make_session(stubbed, STATISTICS)


def test_a_session_keeps_no_reference_to_the_weights_it_was_built_from(rng):
    """
    x(N,4,6,6) -> Conv Relu Conv Relu Conv Add(+proj) Relu -> y (residual_block): onnxruntime copies
    the in-memory weights while it builds the session, so they may be overwritten or freed after.
    """
    model = prepare_model(residual_block(rng))
    stubbed, values = split_weights(model)
    x = inputs(rng, 6, (4, 6, 6))
    for optimize in (False, True):
        want = run_ort(model, {"x": x}, optimize=optimize)[0]
        copies = {name: array.copy() for name, array in values.items()}
        session = make_session(stubbed, _preset(optimize), weights=copies)
        for name in copies:
            copies[name][...] = np.nan
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], want)
        alive = [weakref.ref(array) for array in copies.values()]
        del copies
        assert alive and all(ref() is None for ref in alive), "the session holds none of them"
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], want)
        config = session.get_session_options().get_session_config_entry
        assert config("session.use_device_allocator_for_initializers") == "1"  # outside the arena


INITIALIZER_INPUTS = """
import sys
import onnx
from onnx import helper
sys.path.insert(0, {tests!r})
import numpy as np
from models import two_convs
model = two_convs(np.random.default_rng(0))
for t in model.graph.initializer:
    model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
{session}
"""


@pytest.mark.parametrize(
    ("session", "leaks"),
    [
        (  # a bare session on purpose, not run_ort: the control shows onnxruntime's own logging
            "import onnxruntime as ort; "
            "ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])",
            True,
        ),
        (
            "from egp_onnx.runtime.session import STATISTICS, make_session; make_session(model, STATISTICS)",
            False,
        ),
    ],
    ids=["plain onnxruntime (control)", "egp-onnx session"],
)
def test_onnxruntime_log_lines_never_reach_stderr(session, leaks):
    code = INITIALIZER_INPUTS.format(tests=str(ROOT / "tests"), session=session)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert ("onnxruntime" in proc.stderr) is leaks, proc.stderr


def test_no_onnxruntime_profile_dumps_in_the_repository():
    assert not list(ROOT.glob("onnxruntime_profile__*.json"))
    assert "onnxruntime_profile__*.json" in (ROOT / ".gitignore").read_text().splitlines()


class _Recording:
    """Stands in for a session: records the run options it is given."""

    def __init__(self) -> None:
        self.options: list[ort.RunOptions | None] = []

    def run(self, names, feed, options=None):
        self.options.append(options)
        return [feed["x"]]


def test_a_shrinking_run_gives_the_arena_back_and_a_plain_run_keeps_it(rng):
    """A kept session's arena would hold its largest batch's memory for the rest of the run."""
    fake, x = _Recording(), inputs(rng, 2)
    run_session(fake, None, {"x": x}, shrink=True)  # type: ignore[arg-type]
    run_session(fake, None, {"x": x})  # type: ignore[arg-type]
    shrinking, plain = fake.options
    assert shrinking is not None and shrinking.get_run_config_entry(SHRINK_ARENA) == "cpu:0"
    assert plain is None  # timed runs (verify/latency) keep the arena, as a deployment does
    session = make_session(prepare_model(single_conv(rng)), MEASURE)
    np.testing.assert_array_equal(
        run_session(session, None, {"x": x}, shrink=True)[0], run_session(session, None, {"x": x})[0]
    )
