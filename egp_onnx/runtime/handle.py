"""A model and the onnxruntime session that runs it, and a model's outputs kept in its place.

The memory policy of every model egp-onnx runs lives here. A session holds its own copy of the
weights (more, once onnxruntime has packed them), so:

- A :class:`ModelHandle` builds its session on first use and keeps it: a model that several
  comparisons run (the rewritten model: checked, measured on the held-out data, timed) gets one
  session. The weights it is built from are shared, not copied: the caller may give the ones it
  holds (``known``, or the whole ``split``), and none of them is kept once the session is built.
- :meth:`ModelHandle.release` lets the session go when the model is not run for a while; it is
  built again if the model is run later.
- :class:`StoredOutputs` keeps a model's outputs instead of its session when they take less
  memory than its weights (graph surgery's check: the pruned model's session goes before the
  rewritten model's is built).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

from egp_onnx.graph.weights import initializer_counts, serialized_size, split_weights
from egp_onnx.runtime.session import MEASURE, make_session, run_session

if TYPE_CHECKING:
    from egp_onnx.load.calibration import CalibrationData
    from egp_onnx.load.readers import Batch

#: A feed's input names and shapes: the shapes a session has planned its memory for.
Shapes = tuple[tuple[str, tuple[int, ...]], ...]


class ModelHandle:
    """A model and its onnxruntime session (:data:`MEASURE`), built on first use and reused after."""

    def __init__(
        self,
        model: onnx.ModelProto,
        split: tuple[onnx.ModelProto, dict[str, np.ndarray]] | None = None,
        known: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Keep ``model``; its session is built on first use.

        ``split`` is ``split_weights(model)`` when the caller has made it; ``known``, values of some
        of the model's initializers already read (see :func:`egp_onnx.graph.weights.split_weights`).
        Either saves reading and copying the same weights again. Neither is kept once the session
        is built: onnxruntime holds its own copy of the weights.
        """
        self.model = model
        self._split = split
        self._known = known
        self._session: ort.InferenceSession | None = None
        #: The model's :func:`egp_onnx.graph.weights.initializer_counts`, taken while the session is built
        #: (from the arrays it is built from: the cost figures need no second read of the weights).
        self.counts: dict[str, tuple[bool, int, int]] = {}
        self.warm: set[Shapes] = set()  # input shapes its session has run

    @classmethod
    def of(cls, model: onnx.ModelProto | ModelHandle) -> ModelHandle:
        """``model`` itself if it is a handle, else a new handle of it."""
        return model if isinstance(model, ModelHandle) else cls(model)

    @property
    def session(self) -> ort.InferenceSession:
        """The session (built now if not yet)."""
        if self._session is None:
            stubbed, weights = self._split or split_weights(self.model, known=self._known)
            self._split = self._known = None
            self._session = make_session(stubbed, MEASURE, weights=weights)
            self.counts = initializer_counts(self.model, weights)
        return self._session

    def run(self, names: list[str] | None, feed: Batch) -> list[np.ndarray]:
        """Run one batch; its input shapes are remembered (the session has planned its memory for them).

        The arena shrinks after the run: a handle runs whole data sets at their largest batches and
        may be kept for long after (the original's session, for the latency at the end).
        """
        outputs = run_session(self.session, names, feed, shrink=True)
        self.warm.add(shapes(feed))
        return outputs

    def release(self) -> None:
        """Let the session go (it holds a copy of the weights); it is built again if used again."""
        self._session = None
        self.warm = set()


def shapes(feed: Batch) -> Shapes:
    """The input names and shapes of ``feed``, sorted by name."""
    return tuple(sorted((name, tuple(array.shape)) for name, array in feed.items()))


class StoredOutputs:
    """A model's outputs on every batch of streamed data, kept in memory (the data is not).

    Compared with a candidate in place of the model itself, they let the model's session go before
    the candidate's is built.
    """

    def __init__(self, names: list[str], batches: list[list[np.ndarray]]) -> None:
        self.names, self.batches = names, batches

    @classmethod
    def instead_of(
        cls, model: onnx.ModelProto | ModelHandle, data: CalibrationData, batch_size: int
    ) -> StoredOutputs | ModelHandle:
        """``model``'s outputs on ``data``, its session let go; ``model`` if they outweigh its weights."""
        handle = ModelHandle.of(model)
        limit = serialized_size(handle.model)
        names = [o.name for o in handle.session.get_outputs()]
        batches, size = [], 0
        for feed, _ in data.batches(batch_size):
            outputs = handle.run(names, feed)
            size += sum(np.asarray(o).nbytes for o in outputs)
            if size > limit:
                return handle
            batches.append(outputs)
        handle.release()
        return cls(names, batches)
