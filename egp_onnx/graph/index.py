"""Producer/consumer maps and constants of an ONNX graph, and node attributes: read only."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of the node's attribute ``name`` (helper.get_attribute_value's), else ``default``."""
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """All attributes of the node by name, as :func:`attr` reads them."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class GraphIndex:
    """Producer/consumer maps and constants of a graph, built once."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.graph_inputs = {i.name for i in graph.input if i.name not in self.initializers}
        self.shapes: dict[str, list[int | None]] = {}
        for value in [*graph.value_info, *graph.input, *graph.output]:
            if value.type.tensor_type.HasField("shape"):
                dims = value.type.tensor_type.shape.dim
                self.shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        self._depth: dict[str, int] = {}

    def is_constant(self, tensor: str) -> bool:
        """True for an initializer or the output of a Constant node."""
        if tensor in self.initializers:
            return True
        node = self.producer.get(tensor)
        return node is not None and node.op_type == "Constant"

    def value(self, tensor: str) -> np.ndarray | None:
        """The value of a constant tensor, None for a variable."""
        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Constant":
            value = attr(node, "value")
            return None if value is None else numpy_helper.to_array(value)
        return None

    def scalar(self, tensor: str) -> float | None:
        """The value of a constant one-element tensor, None otherwise (or for no tensor)."""
        value = self.value(tensor) if tensor else None
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def channels(self, tensor: str) -> int | None:
        """Size of axis 1 of ``tensor`` when shape inference fixed it."""
        dims = self.shapes.get(tensor)
        return dims[1] if dims and len(dims) >= 2 else None

    def private(self, tensor: str) -> bool:
        """True when exactly one node reads ``tensor`` (pruning it changes no other use)."""
        return len(self.consumers.get(tensor, [])) == 1

    def depth(self, tensor: str) -> int:
        """Number of nodes on the longest path from a graph input to ``tensor``."""
        if tensor in self._depth:
            return self._depth[tensor]
        # Iterative post-order walk: graphs can be deeper than Python's recursion limit.
        stack = [tensor]
        while stack:
            current = stack[-1]
            node = self.producer.get(current)
            if node is None:
                self._depth[current] = 0
                stack.pop()
                continue
            pending = [i for i in node.input if i and i not in self._depth]
            if pending:
                stack.extend(pending)
                continue
            value = 1 + max((self._depth[i] for i in node.input if i), default=0)
            for out in node.output:
                self._depth[out] = value
            stack.pop()
        return self._depth[tensor]
