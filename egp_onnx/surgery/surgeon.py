"""What one surgery run shares between its rewrites: the graph, the statistics, the result so far.

A rewrite reads layers through :mod:`egp_onnx.surgery.view`, changes the graph with the edits
here (new constants and names, a layer's weights, a bypassed node, a pair of layers replaced by
one) and writes down what it did with :meth:`Surgeon.record` and :meth:`Surgeon.state`; the
rewrites themselves live in :mod:`egp_onnx.surgery.rewrites`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from egp_onnx.report.records import Rewrite
from egp_onnx.surgery.view import LayerView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelStates:
    """Per-channel constancy of one rectifier on the calibration data."""

    always_on: np.ndarray  # bool (C,)
    always_off: np.ndarray  # bool (C,)


@dataclass
class SurgeryResult:
    """The rewritten model, what was done, and the state of every layer that changed."""

    model: onnx.ModelProto
    rewrites: list[Rewrite] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)  # layer name -> identity|constant|merged|removed
    dead_parameters_zeroed: int = 0


Measure = Callable[[onnx.ModelProto], float]


class Surgeon:
    """A graph-surgeon graph being rewritten, with the inputs and the record of one surgery run.

    Attributes:
        graph: the graph the rewrites change (a rewrite that tries a change on a copy swaps it).
        stats: rectifier node name -> channel states measured on the calibration data.
        measure: the relative output error of a candidate model, for merges that are not exact.
        tolerance: the largest measured error at which an inexact merge is applied (0: never).
        result: the rewrites and layer states so far; ``result.model`` is the input until the end.

    """

    def __init__(
        self,
        model: onnx.ModelProto,
        stats: Mapping[str, ChannelStates],
        measure: Measure | None = None,
        tolerance: float = 0.0,
    ) -> None:
        self.graph = gs.import_onnx(model)
        self.stats = stats
        self.measure = measure
        self.tolerance = tolerance
        self.result = SurgeryResult(model)
        self._names = {n.name for n in self.graph.nodes}

    def name(self, base: str) -> str:
        """A node or tensor name not used before in this graph: ``base``, underscores appended."""
        name = base
        while name in self._names:
            name += "_"
        self._names.add(name)
        return name

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        """A new constant tensor named after ``base``."""
        return gs.Constant(self.name(base), np.ascontiguousarray(values))

    def set_layer(self, layer: LayerView, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """Give ``layer`` new weights (in its own dtype), and a new bias unless ``bias`` is None."""
        node = layer.node
        # copy=False: the arrays are never written in place once they are a constant's values
        node.inputs[1] = self.constant(f"{node.name}.weight", weight.astype(layer.weight.dtype, copy=False))
        if bias is not None:
            b = self.constant(f"{node.name}.bias", bias.astype(layer.weight.dtype, copy=False))
            if len(node.inputs) > 2:
                node.inputs[2] = b
            elif node.op == "MatMul":
                self._matmul_bias(node, b)
            else:
                node.inputs.append(b)

    def replace_pair(
        self, a: LayerView, b: LayerView, op: str, attrs: dict, weight: np.ndarray, bias: np.ndarray
    ) -> gs.Node:
        """One ``op`` layer from A's input to B's outputs, in place of the pair A -> B."""
        name = self.name(f"{a.node.name}+{b.node.name}")
        dtype = a.weight.dtype
        inputs = [a.node.inputs[0], self.constant(f"{name}.weight", weight.astype(dtype))]
        if op != "MatMul":
            inputs.append(self.constant(f"{name}.bias", bias.astype(dtype)))
        node = gs.Node(op, name, attrs=attrs, inputs=inputs, outputs=list(b.node.outputs))
        b.node.outputs = []
        a.node.outputs = []
        self.graph.nodes.append(node)
        if op == "MatMul" and np.any(bias):
            self._matmul_bias(node, self.constant(f"{name}.bias", bias.astype(dtype)))
        return node

    def _matmul_bias(self, node: gs.Node, bias: gs.Constant) -> None:
        """A MatMul has no bias input: an Add after it carries the bias."""
        out = node.outputs[0]
        mid = gs.Variable(self.name(f"{node.name}.nobias"), dtype=out.dtype)
        node.outputs = [mid]
        self.graph.nodes.append(
            gs.Node("Add", self.name(f"{node.name}.bias"), inputs=[mid, bias], outputs=[out])
        )

    def bypass(self, node: gs.Node) -> None:
        """Remove a one-input node: its consumers read its input instead."""
        source, out = node.inputs[0], node.outputs[0]
        if out in self.graph.outputs:
            node.op, node.attrs = "Identity", {}  # keep the graph output's name
            while len(node.inputs) > 1:  # gs's synchronized lists cannot delete slices
                node.inputs.pop()
            return
        for consumer in list(out.outputs):
            consumer.inputs = [source if t is out else t for t in consumer.inputs]
        node.outputs = []

    def record(
        self,
        kind: str,
        nodes: tuple[str, ...],
        *,
        exact: bool,
        applied: bool,
        error: float | None = None,
        detail: str = "",
    ) -> None:
        """Add a rewrite applied or declined to the report (``kind``: a registered rewrite's name)."""
        rewrite = Rewrite(kind=kind, nodes=nodes, exact=exact, applied=applied, error=error, detail=detail)
        self.result.rewrites.append(rewrite)
        log.info("%s %s: %s", rewrite.kind, ",".join(rewrite.nodes), rewrite.detail)

    def recorded(self, kind: str, nodes: tuple[str, ...]) -> bool:
        """True when a rewrite of ``kind`` on ``nodes`` was recorded before, applied or declined."""
        return any((r.kind, r.nodes) == (kind, nodes) for r in self.result.rewrites)

    def state(self, name: str, state: str) -> None:
        """Record the latest state of every original layer behind ``name`` (merged names join by +)."""
        for part in name.split("+"):
            self.result.states[part] = state

    def commit(self) -> None:
        """Drop what no output needs any more and sort the nodes: the graph is valid again."""
        self.graph.cleanup().toposort()
