"""onnxruntime sessions: the one place that builds them, with named presets instead of flags.

Every session runs on the CPU with the graph optimised (``ORT_ENABLE_ALL``): the statistics probes
are built to stay inside onnxruntime's fused, blocked-layout graph, segments and measured models
should run as the user's deployment runs them. The presets differ in three things:

- ``lean`` turns off onnxruntime's memory pattern planning, which keeps a plan (and its buffers)
  per input shape: the statistics pass and the segments run many batches and should stay flat in
  memory whatever their number; a measured model runs few shapes and is timed, so it plans.
- ``spinning`` False makes idle worker threads sleep at once instead of spinning. The statistics
  pass keeps onnxruntime's default (only its own sessions run then). Segments alternate with numpy
  work whose BLAS threads spinning workers would starve; two measured models are timed in turn, and
  spinning workers of one would slow the other's runs.
- ``prompt`` runs the nodes in onnxruntime's priority-based order (Kahn's, ready nodes by
  index) instead of its default one (a depth-first walk back from the graph's outputs). The
  statistics model reads its outputs off the model's inner tensors through probe nodes; in the
  default order every probe ran after the whole model, so every probed tensor stayed alive to the
  end (README, RapidOCR: the statistics pass on PP-OCRv4 rec). A segment's outputs are inner
  tensors too, and it runs the same way. A measured model runs in the default order, as the
  user's deployment runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from egp_onnx.errors import CalibrationError, ModelError, one_line
from egp_onnx.graph.weights import IN_MEMORY, split_weights

__all__ = [
    "MEASURE",
    "SEGMENTS",
    "SHRINK_ARENA",
    "STATISTICS",
    "Session",
    "SessionPreset",
    "make_session",
    "quiet",
    "run_session",
]

#: The session type, for annotations outside runtime/ (which never import onnxruntime).
Session = ort.InferenceSession

#: onnxruntime's ERROR severity: its warnings (e.g. unused initializers) stay off stderr
_ERROR = 3
#: onnxruntime's FATAL severity, for sessions: a node that fails logs an ERROR line (coloured, on
#: stderr) and raises the same message, which run_session turns into our one line.
_FATAL = 4


@dataclass(frozen=True)
class SessionPreset:
    """How a session is built: optimisation, memory planning, idle threads, node order (see the module)."""

    optimize: bool
    lean: bool
    spinning: bool
    prompt: bool = False


#: The statistics pass (calibrate): many batches, flat memory, onnxruntime's default threads.
STATISTICS = SessionPreset(optimize=True, lean=True, spinning=True, prompt=True)
#: Segments of a model being refit (runtime.segments): many batches between numpy work.
SEGMENTS = SessionPreset(optimize=True, lean=True, spinning=False, prompt=True)
#: Models that are compared and timed (runtime.handle, verify): planned memory, sleeping threads.
MEASURE = SessionPreset(optimize=True, lean=False, spinning=False)


def quiet() -> None:
    """Keep onnxruntime's own warnings (also from sessions that other libraries open) off stderr.

    Graph warnings come through onnxruntime's default logger, not the session's.
    """
    ort.set_default_logger_severity(_ERROR)


def make_session(
    model: onnx.ModelProto,
    preset: SessionPreset,
    weights: Mapping[str, np.ndarray] | None = None,
    threads: int = 0,
) -> ort.InferenceSession:
    """A CPU session of ``model`` built as ``preset`` says.

    The weights go to onnxruntime from memory, not inside the serialised model (see
    :func:`egp_onnx.graph.weights.split_weights`), which shortens the build of a large model.
    onnxruntime copies them while it builds the session (``AddExternalInitializers``: "the
    user provided buffers can then be deallocated"), so the session keeps no reference to them and
    they are freed with the caller's last one (``set_providers``, which would read them again, is
    never called on these sessions). ``weights`` gives the values of stubs already in ``model``.
    ``threads`` is onnxruntime's intra-op thread count (0: its default, one per physical core).

    Raises:
        ModelError: a stub has no value in ``weights``, or onnxruntime cannot load the model.

    """
    quiet()
    options = ort.SessionOptions()
    options.log_severity_level = _FATAL
    options.enable_mem_pattern = not preset.lean
    options.intra_op_num_threads = threads
    if preset.prompt:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if not preset.spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The weights outside the memory arena, whose chunks round them up: a session takes less
    # memory, its outputs are the same.
    options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if preset.optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    stubbed, values = split_weights(model)
    stubs = [t.name for t in stubbed.graph.initializer if t.name not in values and _is_stub(t)]
    missing = [name for name in stubs if weights is None or name not in weights]
    if missing:
        raise ModelError(f"no values for the in-memory initializers {', '.join(missing[:3])}")
    arrays = [np.ascontiguousarray(a) for a in [*values.values(), *(weights[n] for n in stubs if weights)]]
    held = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if held:
        options.add_external_initializers([*values, *stubs], held)
    try:
        serialized = stubbed.SerializeToString()
        session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        raise ModelError(f"onnxruntime cannot load the model: {one_line(exc)}") from exc
    return session


def _is_stub(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == tensor.EXTERNAL and any(
        e.key == "location" and e.value == IN_MEMORY for e in tensor.external_data
    )


def _shrinking() -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry(SHRINK_ARENA, "cpu:0")
    return options


#: The run option that gives the CPU memory arena's free chunks back when a run ends.
SHRINK_ARENA = "memory.enable_memory_arena_shrinkage"


def run_session(
    session: ort.InferenceSession,
    names: list[str] | None,
    feed: dict[str, np.ndarray],
    shrink: bool = False,
) -> list[np.ndarray]:
    """``session.run`` with onnxruntime's failures turned into a one-line CalibrationError.

    The message gives the batch's shapes: with inputs of many sizes, they say which data failed.
    ``shrink`` gives the arena's free chunks back when the run ends: onnxruntime's arena never
    shrinks otherwise, so a session kept for later (the original's, for the latency) would hold
    what its largest batch needed for the rest of the run. Timed runs do not shrink (a deployment
    keeps its arena).
    """
    try:
        if shrink:
            return list(session.run(names, feed, _shrinking()))
        return list(session.run(names, feed))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeException types
        shapes = ", ".join(f"{name} {tuple(np.shape(array))}" for name, array in feed.items())
        raise CalibrationError(f"onnxruntime rejected a batch ({shapes}): {one_line(exc)}") from exc
