"""Activation sites of a graph: which rectifier (or its slice of a Concat) each layer owns.

A site is an activation (graph/ops.py's ACTIVATIONS), an ONNX op or a decomposed form, with the
layer that owns its input (graph/layers.py's ``trace``). After a channel Concat, each input's
channels are owned by that input's producer, and the activation gives one site per slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from egp_onnx.graph.index import GraphIndex, attr
from egp_onnx.graph.layers import Layer, trace
from egp_onnx.graph.ops import ACTIVATIONS


@dataclass(frozen=True)
class RectifierSite:
    """An activation, the tensor whose sign is counted, and the layer that owns it.

    After a channel Concat each input's channels are owned by that input's producer: the
    activation then gives one site per slice, named ``node[start:stop]``, with ``channels`` set.
    """

    name: str  # unique key of the site: the activation node's name, or node[start:stop]
    op_type: str  # Relu, Clip, LeakyRelu, PRelu, HardSwish, SiLU, Gelu, or a reported op
    input: str  # z: ON = z > 0
    owner: Layer | None
    channel_last: bool
    node: str = ""  # the activation node (for a decomposed form: its last node); "" = name
    channels: tuple[int, int] | None = None  # the slice of z's channels this site covers
    kind: str = ""  # relu, relu6, leaky_relu, prelu, hardswish, silu, gelu; "" = reported only

    def __post_init__(self) -> None:
        if not self.node:
            object.__setattr__(self, "node", self.name)

    @property
    def prunable(self) -> bool:
        """A member of the rectifier family with an owning layer guides pruning."""
        return bool(self.kind) and self.owner is not None


def _concat_slices(node: onnx.NodeProto, index: GraphIndex) -> list[tuple[int, int, Layer | None]] | None:
    """(start, stop, owner) of every input of a channel Concat, nested Concats flattened."""
    slices: list[tuple[int, int, Layer | None]] = []
    start = 0
    for tensor in node.input:
        width = index.channels(tensor)
        if width is None:
            return None
        found = trace(tensor, index)
        if isinstance(found, onnx.NodeProto):
            inner = _concat_slices(found, index)
            if inner is None:
                return None
            slices.extend((start + a, start + b, owner) for a, b, owner in inner)
        else:
            owner = found if found is not None and found.out_channels == width else None
            slices.append((start, start + width, owner))
        start += width
    return slices


def _clip_min(node: onnx.NodeProto, index: GraphIndex) -> float | None:
    """The lower bound of a Clip (attribute before opset 11, input after), None when not constant."""
    low = attr(node, "min")
    if low is not None:
        return float(low)
    if len(node.input) > 1 and node.input[1]:
        return index.scalar(node.input[1])
    return None


def _hard_sigmoid_of(tensor: str, x: str, index: GraphIndex) -> bool:
    """True when ``tensor`` is relu6(x + 3) / 6 in any of the written forms, or HardSigmoid(x)."""
    node = index.producer.get(tensor)
    if node is None:
        return False
    if node.op_type == "HardSigmoid":
        return node.input[0] == x
    if node.op_type in ("Div", "Mul") and len(node.input) == 2:
        inner = next((t for t in node.input if not index.is_constant(t)), None)
        return inner is not None and _relu6_of_x_plus_3(inner, x, index)
    return False


def _relu6_of_x_plus_3(tensor: str, x: str, index: GraphIndex) -> bool:
    node = index.producer.get(tensor)
    if node is None or node.op_type != "Clip" or _clip_min(node, index) != 0.0:
        return False
    add = index.producer.get(node.input[0])
    return (
        add is not None
        and add.op_type == "Add"
        and x in add.input
        and any(index.scalar(t) == 3.0 for t in add.input)
    )


def _decomposed(node: onnx.NodeProto, index: GraphIndex) -> tuple[str, str, set[str]] | None:
    """(op_type, input x, inner nodes) when ``node`` ends a decomposed SiLU/HardSwish/Gelu."""
    if node.op_type == "Erf":
        scaled = index.producer.get(node.input[0])
        if scaled is not None and scaled.op_type in ("Div", "Mul") and len(scaled.input) == 2:
            x = next((t for t in scaled.input if not index.is_constant(t)), None)
            if x is not None:
                return "Gelu", x, set()
        return None
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    a, b = node.input
    for x, gate in ((a, b), (b, a)):
        if node.op_type == "Div" or index.is_constant(x):
            continue
        producer = index.producer.get(gate)
        if producer is not None and producer.op_type == "Sigmoid" and producer.input[0] == x:
            return "SiLU", x, {producer.name}
        if _hard_sigmoid_of(gate, x, index):
            return "HardSwish", x, _gate_nodes(gate, index)
        if _relu6_of_x_plus_3(gate, x, index):  # (x * relu6(x + 3)) / 6: the Mul ends it
            return "HardSwish", x, _gate_nodes(gate, index)
    return None


def _gate_nodes(gate: str, index: GraphIndex) -> set[str]:
    """Names of the HardSigmoid, or the [Div/Mul ->] Clip -> Add(x, 3), nodes of a HardSwish gate."""
    node = index.producer.get(gate)
    names: set[str] = set()
    if node is not None and node.op_type in ("Div", "Mul"):
        names.add(node.name)
        inner = next((t for t in node.input if not index.is_constant(t)), "")
        node = index.producer.get(inner)
    if node is not None and node.op_type in ("HardSigmoid", "Clip"):
        names.add(node.name)
        add = index.producer.get(node.input[0]) if node.op_type == "Clip" else None
        if add is not None and add.op_type == "Add":
            names.add(add.name)
    return names


def _activation(node: onnx.NodeProto, index: GraphIndex) -> tuple[str, str, str] | None:
    """(op_type, input, kind) of an activation node; kind "" for reported-only ones."""
    if not node.input:
        return None
    known = ACTIVATIONS.get(node.op_type)
    if known is not None:
        in_family = not known.from_zero or _clip_min(node, index) == 0.0
        return node.op_type, node.input[0], known.kind if in_family else ""
    decomposed = _decomposed(node, index)
    if decomposed is not None:
        op_type, x, _ = decomposed
        return op_type, x, ACTIVATIONS[op_type].kind
    return None


def find_rectifiers(model: onnx.ModelProto) -> list[RectifierSite]:
    """All activation sites of the main graph in node order, each with its owning layer(s)."""
    index = GraphIndex(model.graph)
    inner: set[str] = set()
    for node in model.graph.node:
        decomposed = _decomposed(node, index)
        if decomposed is not None:
            inner |= decomposed[2]
    sites: list[RectifierSite] = []
    for node in model.graph.node:
        found = _activation(node, index) if node.name not in inner else None
        if found is None:
            continue
        op_type, z, kind = found
        traced = trace(z, index)
        if isinstance(traced, onnx.NodeProto):
            slices = _concat_slices(traced, index)
            if slices is not None and any(owner is not None for _, _, owner in slices):
                sites.extend(
                    RectifierSite(f"{node.name}[{a}:{b}]", op_type, z, owner, False, node.name, (a, b), kind)
                    for a, b, owner in slices
                )
                continue
            traced = None
        owner = traced
        sites.append(
            RectifierSite(
                name=node.name,
                op_type=op_type,
                input=z,
                owner=owner,
                channel_last=owner is not None and owner.op_type == "MatMul",
                kind=kind,
            )
        )
    return sites


def prunable_layers(sites: list[RectifierSite]) -> dict[str, RectifierSite]:
    """Map layer name -> the first rectifier (or rectifier slice) it owns; these are pruned."""
    result: dict[str, RectifierSite] = {}
    for site in sites:
        if site.prunable and site.owner is not None and site.owner.name not in result:
            result[site.owner.name] = site
    return result
