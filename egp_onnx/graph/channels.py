"""Channel groups: which output channels of a layer can leave the graph whole, and what they touch.

A group is a producer layer (Conv with one group, Gemm, or a MatMul with a 2-D weight) whose
output channels travel, each on its own, to consumer layers that read them as input columns:

    producer -> [BatchNormalization | Add/Sub/Mul/Div by a constant | depthwise Conv | Identity]*
             -> rectifier (Relu, or Clip from 0) -> [MaxPool | AveragePool | GlobalAveragePool |
             GlobalMaxPool | Identity | Dropout | Concat on channels | Flatten]* -> consumers

Removing channel c cuts the producer's weight row and bias entry, the matching entry of every
per-channel parameter on the way (BN's four vectors, a per-channel constant, a depthwise Conv's
filter and bias), and column(s) c of every consumer's weight: at a channel Concat the columns
start at the Concat offset, after a Flatten channel c owns S consecutive columns (S = spatial
size). The rectifier is the last one on every path to the consumers: an always-OFF channel is 0
there and after it, so removing it changes no consumer's input (exact).

A residual Add joins the channels of its two operands: channel c of the stream is channel c of
every layer that writes into it (each block's last conv, a projection shortcut, the stem) and of
every tensor the Adds chain through. Such channels move together: the group then has several
producers (found by walking back from each Add's other operand) and several rectifiers, and a
channel is always OFF only when it is OFF at every one of them. A grouped Conv, a graph output,
or any op not listed here ties the channels for good: the group is not offered (its reason is
reported). Channels inside a residual branch (a block's first conv) form groups of their own.

A residual branch (:func:`residual_branches`) is one operand of a residual Add with the nodes
that feed it alone: once every channel inside it is gone it is a constant, and the block
``x + F(x)`` becomes ``x + c`` (surgery/narrow.py: ``without_branch``), its layers out of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from egp_onnx.graph.index import GraphIndex, attr
from egp_onnx.graph.layers import layer_of

#: Per channel, zero-preserving ops after the rectifier: a channel that is 0 stays 0 through them.
PASS_ZERO = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Dropout")
#: Per-channel affine ops between the producer and the rectifier.
AFFINE_CONSTANT = ("Add", "Sub", "Mul", "Div")


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the group's channels: columns ``offset + c * per + [0, per)`` of ``axis``."""

    node: str
    weight: str
    axis: int
    offset: int
    per: int


@dataclass(frozen=True)
class ChannelGroup:
    """A producer's output channels, with every initializer slice their removal cuts.

    ``slices`` are (initializer, axis) pairs cut at the removed channel indices themselves (the
    producers' weights and biases, BN's vectors, per-channel constants, depthwise filters).
    ``rectifiers`` are the deciding activation nodes, each with the group's first channel in it
    (non-zero after a Concat). ``grouped`` are depthwise Conv nodes whose ``group``
    attribute equals the channel count; ``tensors`` the tensors whose channel axis narrows.
    """

    producer: str  # the first producer in node order: the group's name
    channels: int
    rectifiers: tuple[tuple[str, int], ...]  # (activation node, the group's first channel in it)
    slices: tuple[tuple[str, int], ...]
    consumers: tuple[Consumer, ...]
    grouped: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()
    producers: tuple[str, ...] = ()  # every layer writing the channels (a residual stream's several)

    @property
    def rectifier(self) -> str:
        """The rectifier nodes' names, joined (for the report)."""
        return ",".join(name for name, _ in self.rectifiers)


@dataclass(frozen=True)
class Branch:
    """One operand of a residual Add and the nodes that feed only it (the branch's layers among them).

    ``operand`` is the Add's input the branch computes, ``rank`` its rank (4: NCHW, 2: N x C),
    ``channels`` its channel count.
    """

    add: str
    operand: str
    nodes: tuple[str, ...]  # in graph order
    layers: tuple[str, ...]
    rank: int
    channels: int


#: The initializers of an emptied branch's ``x + c`` are named after its Add and this suffix
#: (``<add>.constant.bias`` holds c): what :func:`emptied_branches` reads back.
CONSTANT = ".constant"


def constant_names(add: str) -> list[str]:
    """The initializers of ``add``'s ``x + c`` BatchNormalization: scale, bias (c), mean, var."""
    return [f"{add}{CONSTANT}.{part}" for part in ("scale", "bias", "mean", "var")]


@dataclass(frozen=True)
class EmptiedBranch:
    """A residual Add of the original that a model has as ``x + c`` (surgery/narrow.py writes it)."""

    add: str  # the Add's name, and the BatchNormalization's that replaced it
    operand: str  # the Add's input the branch computed (the original's tensor)
    bias: str  # the initializer holding c


@dataclass
class _Walk:
    """What the forward walk from one producer collected; ``problem`` set when the group is tied."""

    slices: list[tuple[str, int]] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    grouped: list[str] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    rectifiers: set[tuple[str, int]] = field(default_factory=set)
    junctions: list[onnx.NodeProto] = field(default_factory=list)  # residual Adds met on the way
    problem: str | None = None


def channel_groups(model: onnx.ModelProto) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The free channel groups of ``model`` in node order, and why every other layer's are tied.

    Needs the channel counts shape inference writes into ``value_info`` for Concat inputs and
    Flatten inputs (the loader runs it); where one is missing the group is tied.
    """
    index = GraphIndex(model.graph)
    outputs = {o.name for o in model.graph.output}
    groups: list[ChannelGroup] = []
    tied: dict[str, str] = {}
    done: set[str] = set()
    nodes = {node.name or node.output[0]: node for node in model.graph.node}
    for node in model.graph.node:
        name = node.name or node.output[0]
        if name in done or layer_of(node, index) is None:
            continue
        found = _group_from(node, index, outputs, nodes)
        members = found[1] if isinstance(found, tuple) else [name]
        done.update(members)
        if isinstance(found, str):
            tied.update(dict.fromkeys(members, found))
            continue
        group, _ = found
        groups.append(group)
    return groups, tied


def _group_from(
    node: onnx.NodeProto, index: GraphIndex, outputs: set[str], nodes: dict[str, onnx.NodeProto]
) -> tuple[ChannelGroup, list[str]] | str:
    """The group of ``node``'s output channels, with every producer a residual Add joins to it."""
    producers = [node]
    while True:
        walk = _Walk()
        channels = None
        for producer in producers:
            layer = layer_of(producer, index)
            if layer is None:
                return f"{producer.name} writes into its channels and is not a layer"
            problem = _producer_problem(producer, index)
            if problem is not None:
                return problem if producer is node else f"{producer.name} joins them: {problem}"
            if channels is not None and layer.out_channels != channels:
                return f"{producer.name} joins them with another channel count"
            channels = layer.out_channels
            rank = 4 if producer.op_type == "Conv" else 2
            walk.slices.append((layer.weight, _out_axis(producer)))
            if len(producer.input) > 2 and producer.input[2]:
                walk.slices.append((producer.input[2], 0))
            _follow(producer.output[0], index, outputs, walk, layer.out_channels, rank, None, 0, 1)
            if walk.problem is not None:
                return walk.problem
        # Each residual Add's operands must all come from the group's producers.
        reached = set(walk.tensors)
        more: list[onnx.NodeProto] = []
        for add in walk.junctions:
            for operand in add.input:
                if operand in reached:
                    continue
                sources = _sources(operand, index)
                if isinstance(sources, str):
                    return f"{add.name}: a residual Add joins them to {sources}"
                more.extend(p for p in sources if p not in producers and p not in more)
        if not more:
            break
        producers.extend(more)
    assert channels is not None
    if not walk.consumers:
        return "no layer reads its channels"
    names = sorted((p.name or p.output[0] for p in producers), key=lambda n: list(nodes).index(n))
    group = ChannelGroup(
        producer=names[0],
        channels=channels,
        rectifiers=tuple(sorted(walk.rectifiers)),
        slices=tuple(dict.fromkeys(walk.slices)),
        consumers=tuple(dict.fromkeys(walk.consumers)),
        grouped=tuple(dict.fromkeys(walk.grouped)),
        tensors=tuple(dict.fromkeys(walk.tensors)),
        producers=tuple(names),
    )
    return group, names


def _sources(tensor: str, index: GraphIndex) -> list[onnx.NodeProto] | str:
    """The layers whose channels reach ``tensor`` one to one (through per-channel ops and Adds)."""
    node = index.producer.get(tensor)
    if node is None:
        return "a graph input"
    if layer_of(node, index) is not None:
        return [node]
    op = node.op_type
    variables = [t for t in node.input if t and not index.is_constant(t)]
    per_channel = op in ("BatchNormalization", "Relu", *PASS_ZERO) or (
        op == "Clip" and _clip_from_zero(node, index)
    )
    if (per_channel or op in AFFINE_CONSTANT) and len(variables) == 1 and node.input[0] == variables[0]:
        return _sources(variables[0], index)
    if op == "Add" and len(variables) == 2:
        found: list[onnx.NodeProto] = []
        for t in variables:
            sub = _sources(t, index)
            if isinstance(sub, str):
                return sub
            found.extend(sub)
        return found
    return f"{node.name} ({op})"


def _out_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return 1 if node.op_type == "MatMul" else 0


def _producer_problem(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """Why a layer cannot give up output channels on its own, None when it can."""
    if node.op_type == "Conv" and attr(node, "group", 1) != 1:
        return "a grouped Conv: its output channels are tied to its input channels"
    if node.op_type == "Gemm" and (attr(node, "alpha", 1.0) != 1.0 or attr(node, "transA", 0)):
        return "a Gemm with alpha or transA"
    if node.op_type == "MatMul" and len(index.initializers[node.input[1]].dims) != 2:
        return "a MatMul with a batched weight"
    if node.op_type == "Conv" and len(index.initializers[node.input[1]].dims) != 4:
        return "not a 2-D Conv"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (bias not in index.initializers or not index.private(bias)):
        return "its bias is not an initializer of its own"
    if node.op_type == "Gemm" and bias is not None and len(index.initializers[bias].dims) != 1:
        return "its bias is not a vector"
    return None


def _follow(
    tensor: str,
    index: GraphIndex,
    outputs: set[str],
    walk: _Walk,
    channels: int,
    rank: int,
    rectifier: tuple[str, int] | None,
    offset: int,
    per: int,
) -> None:
    """Walk the group's channels forward from ``tensor``, collecting slices and consumers."""
    if walk.problem is not None:
        return
    if tensor in outputs:
        walk.problem = "its channels reach a graph output"
        return
    if tensor in walk.tensors:  # reached again through a residual Add: walked already
        return
    walk.tensors.append(tensor)
    readers = index.consumers.get(tensor, [])
    if not readers:
        walk.problem = "its channels reach a dead end"
        return
    for node in readers:
        problem = _step(node, tensor, index, outputs, walk, channels, rank, rectifier, offset, per)
        if problem is not None:
            walk.problem = walk.problem or problem
            return


def _step(
    node: onnx.NodeProto,
    tensor: str,
    index: GraphIndex,
    outputs: set[str],
    walk: _Walk,
    channels: int,
    rank: int,
    rectifier: tuple[str, int] | None,
    offset: int,
    per: int,
) -> str | None:
    """Take one reader of the group's tensor; returns why the group is tied, or None."""
    op, first = node.op_type, bool(node.input) and node.input[0] == tensor
    out = node.output[0] if node.output else ""
    layer = layer_of(node, index) if first else None
    if layer is not None and op == "Conv" and attr(node, "group", 1) != 1:
        if attr(node, "group", 1) != channels or layer.out_channels != channels or per != 1 or offset:
            return "a grouped Conv reads them"
        # A depthwise Conv keeps channel c in channel c: its filter and bias go with the channel,
        # and the channel needs a rectifier after it again (its bias makes a 0 input non-zero).
        walk.slices.append((node.input[1], 0))
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in index.initializers or not index.private(node.input[2]):
                return "a depthwise Conv with a shared or computed bias reads them"
            walk.slices.append((node.input[2], 0))
        walk.grouped.append(node.name)
        _follow(out, index, outputs, walk, channels, rank, None, offset, per)
        return None
    if layer is not None:
        if rectifier is None:
            return f"{node.name} reads them without a rectifier between"
        if op == "Gemm" and (attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0):
            return f"{node.name}: a Gemm with alpha or transA reads them"
        if op == "Conv" and (per != 1 or rank != 4):
            return f"{node.name} reads them flattened"
        if op in ("Gemm", "MatMul") and (rank != 2 and per == 1 and op == "Gemm"):
            return f"{node.name} reads them with spatial axes"
        axis = 1 if op == "Conv" else (1 if op == "Gemm" and attr(node, "transB", 0) else 0)
        if op == "MatMul" and len(index.initializers[node.input[1]].dims) != 2:
            return f"{node.name}: a batched MatMul reads them"
        walk.consumers.append(Consumer(node.name, node.input[1], axis, offset, per))
        walk.rectifiers.add(rectifier)
        return None
    if op == "BatchNormalization" and first:
        params = node.input[1:5]
        if not all(p in index.initializers and index.private(p) for p in params):
            return f"{node.name}: a BatchNormalization with shared or computed parameters"
        walk.slices.extend((p, 0) for p in params)
        _follow(out, index, outputs, walk, channels, rank, None, offset, per)
        return None
    if op in AFFINE_CONSTANT and len(node.input) == 2 and per == 1:
        other = node.input[1] if first else node.input[0]
        if op == "Add" and other != tensor and not index.is_constant(other):
            # a residual Add: the other operand's producers join the group (channel_groups)
            walk.junctions.append(node)
            _follow(out, index, outputs, walk, channels, rank, None, offset, per)
            return None
        if other == tensor or not index.is_constant(other):
            return f"{node.name} ({op}) meets them with another tensor (tied channels)"
        if op == "Div" and not first:
            return f"{node.name} divides by them"
        value = index.value(other)
        if value is None:
            return f"{node.name}: a constant it cannot read"
        axis = _channel_axis(value.shape, rank, channels)
        if axis == -2:
            return f"{node.name}: a constant that is not per channel"
        if axis >= 0:
            if other not in index.initializers or not index.private(other):
                return f"{node.name}: a per-channel constant shared with other nodes"
            walk.slices.append((other, axis))
        _follow(out, index, outputs, walk, channels, rank, None, offset, per)
        return None
    if op == "Relu" or (op == "Clip" and _clip_from_zero(node, index)):
        if per != 1:
            return f"{node.name}: a rectifier after a Flatten"
        _follow(out, index, outputs, walk, channels, rank, (node.name, offset), offset, per)
        return None
    if op in PASS_ZERO and first:
        if rectifier is None:
            return f"{node.name} ({op}) before any rectifier"
        _follow(out, index, outputs, walk, channels, rank, rectifier, offset, per)
        return None
    if op == "Flatten" and first and attr(node, "axis", 1) == 1:
        shape = index.shapes.get(tensor)
        if rank == 2:
            _follow(out, index, outputs, walk, channels, 2, rectifier, offset, per)
            return None
        if shape is None or len(shape) != rank or any(d is None for d in shape[2:]):
            return f"{node.name}: a Flatten of unknown spatial size"
        size = int(np.prod([d for d in shape[2:] if d is not None]))
        _follow(out, index, outputs, walk, channels, 2, rectifier, offset * size, per * size)
        return None
    if op == "Concat" and _channel_axis_attr(node, rank):
        before = 0
        for other in node.input:
            if other == tensor:
                break
            width = index.channels(other)
            if width is None:
                return f"{node.name}: a Concat whose inputs' widths are unknown"
            before += width
        if list(node.input).count(tensor) != 1:
            return f"{node.name}: a Concat that reads them twice"
        _follow(out, index, outputs, walk, channels, rank, rectifier, offset + before * per, per)
        return None
    return f"{node.name} ({op}) reads them"


def _channel_axis(shape: tuple[int, ...], rank: int, channels: int) -> int:
    """Axis of a broadcast constant that runs over the channels; -1 for a scalar, -2 otherwise."""
    if int(np.prod(shape)) == 1:
        return -1
    axis = len(shape) - (rank - 1)  # the channel axis (1 of the tensor's rank), aligned from the right
    if rank == 2:
        axis = len(shape) - 1
    if 0 <= axis < len(shape) and shape[axis] == channels and int(np.prod(shape)) == channels:
        return axis
    return -2


def _channel_axis_attr(node: onnx.NodeProto, rank: int) -> bool:
    axis = attr(node, "axis", 0)
    return axis == 1 or axis + rank == 1


def _clip_from_zero(node: onnx.NodeProto, index: GraphIndex) -> bool:
    low = attr(node, "min")
    if low is None and len(node.input) > 1 and node.input[1]:
        low = index.scalar(node.input[1])
    return low is not None and float(low) == 0.0


def residual_branches(model: onnx.ModelProto) -> list[Branch]:
    """Every operand of a residual Add (two variables) fed by at least one layer of its own, in node order.

    A node belongs to the branch when everything that reads its outputs does (and none is a graph
    output): removing the operand removes exactly these nodes. Only NCHW (rank 4) and N x C (rank
    2) operands are offered, whose per-channel constant is a (1, C, 1, 1) or (C,) tensor.
    """
    index = GraphIndex(model.graph)
    outputs = {o.name for o in model.graph.output}
    names = [node.name or node.output[0] for node in model.graph.node]
    found = []
    for add in model.graph.node:
        if add.op_type != "Add" or len(add.input) != 2 or any(index.is_constant(t) for t in add.input):
            continue
        if add.input[0] == add.input[1]:
            continue
        for operand in add.input:
            shape = index.shapes.get(operand)
            if shape is None or len(shape) not in (2, 4) or not shape[1]:
                continue
            private = _feeding_only(operand, add, index, outputs)
            layers = [n for n in private if layer_of(n, index) is not None]
            if layers:
                order = sorted(private, key=lambda n: names.index(n.name or n.output[0]))
                found.append(
                    Branch(
                        add.name or add.output[0],
                        operand,
                        tuple(n.name or n.output[0] for n in order),
                        tuple(n.name or n.output[0] for n in order if layer_of(n, index) is not None),
                        len(shape),
                        int(shape[1]),
                    )
                )
    return found


def _feeding_only(
    operand: str, add: onnx.NodeProto, index: GraphIndex, outputs: set[str]
) -> list[onnx.NodeProto]:
    """The nodes every path from which to a graph output goes through ``operand`` into ``add``."""
    private: list[onnx.NodeProto] = []
    ids: set[int] = set()
    todo = [index.producer[operand]] if operand in index.producer else []
    while todo:
        node = todo.pop()
        if id(node) in ids:
            continue
        own = all(
            out not in outputs
            and all(
                id(r) in ids or (r is add and out == operand and list(add.input).count(operand) == 1)
                for r in index.consumers.get(out, [])
            )
            for out in node.output
            if out
        )
        if not own:
            continue
        private.append(node)
        ids.add(id(node))
        todo.extend(index.producer[t] for t in node.input if t in index.producer)
        # a node met before its last reader joined is met again through that reader
    return private


def emptied_branches(original: onnx.ModelProto, model: onnx.ModelProto) -> list[EmptiedBranch]:
    """The residual Adds of ``original`` that ``model`` has emptied into ``x + c``, in graph order.

    Found by the form ``without_branch`` writes: a BatchNormalization named as an Add of the
    original, reading the initializers named with :data:`CONSTANT`; the branch's operand is the
    Add's input the BatchNormalization does not read.
    """
    # named as without_branch names them: an unnamed node by its output
    adds = {n.name or n.output[0]: n for n in original.graph.node if n.op_type == "Add"}
    found = []
    for node in model.graph.node:
        add = adds.get(node.name)
        if add is None or node.op_type != "BatchNormalization" or len(node.input) != 5:
            continue
        if list(node.input[1:]) != constant_names(node.name):
            continue
        operand = next((t for t in add.input if t != node.input[0]), None)
        if operand is not None:
            found.append(EmptiedBranch(node.name, operand, node.input[2]))
    return found
