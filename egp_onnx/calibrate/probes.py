"""The statistics model: the user's model with a small probe behind every observed tensor.

Pure ONNX graph building (see :class:`Probe`); :mod:`egp_onnx.calibrate.collect` runs it. Only
per-channel figures leave the graph, so memory stays flat in the number of samples and no
activation is copied out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from egp_onnx.graph.ops import ACTIVATIONS
from egp_onnx.graph.rectifiers import RectifierSite
from egp_onnx.graph.walk import graph_names, subgraphs
from egp_onnx.graph.weights import drop_unread

#: float32's largest value: HardSigmoid's slope in the fast probe (any positive normal float -> 1)
_BIG = float(np.finfo(np.float32).max)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


@dataclass(frozen=True)
class Probe:
    """How one tensor is observed in the statistics model.

    The fast probe computes Clip(BIG * t, 0, 1) as HardSigmoid(alpha=BIG, beta=0) (1 where t > 0,
    0 where t <= 0; BIG is float32's largest value, so every positive normal float maps to 1) and
    averages it with GlobalAveragePool. Both ops run in onnxruntime's blocked NCHWc layout, so the
    activation is neither copied out nor reordered; counts are mean x spatial size, rounded. The
    general probe is ReduceSum(Cast(Greater(t, 0))) with Size(t), for every other case.
    """

    tensor: str  # the relu output (same sign as its input), or the activation's input
    fast: bool
    channels: int | None
    rank: int | None
    channel_last: bool = False


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    infos = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        infos[value.name] = value
    return infos


def probes(model: onnx.ModelProto, sites: Sequence[RectifierSite], fast: bool = True) -> list[Probe]:
    """The probe of every site (shapes and types come from the model's inferred value_info).

    A ReLU is probed on its output, which has the sign of its input and keeps onnxruntime's
    Conv+ReLU fusion; every other activation on its input z (ON = z > 0).
    """
    infos = _value_infos(model)
    at_output = {op for op, activation in ACTIVATIONS.items() if activation.probe_output}
    outputs = {n.name: n.output[0] for n in model.graph.node if n.op_type in at_output}
    result = []
    for site in sites:
        tensor = outputs.get(site.node, site.input) if site.op_type in at_output else site.input
        info = infos.get(tensor)
        rank = channels = None
        elem: int = TensorProto.FLOAT
        if info is not None and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            rank = len(dims)
            if rank >= 2 and dims[1].HasField("dim_value"):
                channels = int(dims[1].dim_value)
            elem = info.type.tensor_type.elem_type or elem
        if site.channel_last and site.owner is not None:
            channels = site.owner.out_channels
        use_fast = (
            fast
            and not site.channel_last
            and rank is not None
            and rank >= 3
            and channels is not None
            and elem == TensorProto.FLOAT  # HardSigmoid's slope is a float32 attribute
        )
        result.append(Probe(tensor, use_fast, channels, rank, site.channel_last))
    return result


def plan(model: onnx.ModelProto, sites: Sequence[RectifierSite], fast: bool) -> tuple[list[Probe], list[int]]:
    """The distinct probes (sites on slices of one tensor share one) and each site's probe index."""
    unique: dict[Probe, int] = {}
    index = []
    for probe in probes(model, sites, fast):
        index.append(unique.setdefault(probe, len(unique)))
    return list(unique), index


def probe_prefix(model: onnx.ModelProto) -> str:
    """A prefix no name of ``model`` starts with: the probe's tensors and nodes cannot collide."""
    names = graph_names(model.graph)
    prefix, k = "egp", 0
    while any(n.startswith(prefix) for n in names):
        k += 1
        prefix = f"egp{k}x"
    return prefix


def count_name(prefix: str, i: int) -> str:
    """The i-th probe's output: a general probe's count, or a fast probe's pooled mean."""
    return f"{prefix}_on_count__{i}"


def size_name(prefix: str, i: int) -> str:
    """The i-th (general) probe's tensor size output."""
    return f"{prefix}_size__{i}"


def fraction_name(prefix: str, rank: int) -> str:
    """The output that joins the fast probes' ON fractions on rank-``rank`` tensors."""
    return f"{prefix}_on_fraction__{rank}"


def fast_groups(probes: Sequence[Probe]) -> dict[int, list[int]]:
    """The fast probes' indices by tensor rank: each group's ON fractions leave in one Concat."""
    groups: dict[int, list[int]] = {}
    for i, probe in enumerate(probes):
        if probe.fast:
            assert probe.rank is not None  # checked by probes()
            groups.setdefault(probe.rank, []).append(i)
    return groups


def _elem_type(model: onnx.ModelProto, tensor: str) -> int:
    info = _value_infos(model).get(tensor)
    if info is not None and info.type.tensor_type.elem_type:
        return int(info.type.tensor_type.elem_type)
    return TensorProto.FLOAT


def statistics_model(
    model: onnx.ModelProto, sites: Sequence[RectifierSite], fast: bool = True
) -> onnx.ModelProto:
    """The model whose only outputs are the per-channel ON statistics of ``sites``.

    Output ``P_on_fraction__r`` holds the (N, C, 1, ...) ON fraction per sample of every fast
    probe on a rank-r tensor, their channels end to end in probe order (one Concat of the pooled
    means: one output, and in onnxruntime's blocked layout one reorder instead of one per probe).
    A general probe's ``P_on_count__i`` is the int64 (C,) count of the i-th distinct probed
    tensor and ``P_size__i`` the tensor's size. ``P`` is :func:`probe_prefix` (``egp`` unless the
    model already has names starting with it).
    """
    pre = probe_prefix(model)
    stats = onnx.ModelProto()
    stats.CopyFrom(model)
    graph = stats.graph
    opset = _opset(model)
    del graph.output[:]
    graph.initializer.append(helper.make_tensor(f"{pre}_shape_nc", TensorProto.INT64, [3], [0, 0, -1]))
    if opset >= 13:
        graph.initializer.append(helper.make_tensor(f"{pre}_axes_02", TensorProto.INT64, [2], [0, 2]))
        graph.initializer.append(helper.make_tensor(f"{pre}_axes_0", TensorProto.INT64, [1], [0]))
    planned = plan(model, sites, fast)[0]
    for i, probe in enumerate(planned):
        if probe.fast:
            graph.node.extend(_fast_probe_nodes(probe, pre, i))
        else:
            _add_general_probe(graph, probe, pre, i, _elem_type(model, probe.tensor), opset)
    _add_fraction_outputs(graph, model, planned, pre)
    _drop_unused_nodes(graph)
    return stats


def _fast_probe_nodes(probe: Probe, pre: str, i: int) -> list[onnx.NodeProto]:
    """The fast probe's nodes: its pooled ON fraction is ``P_on_count__i`` (joined by Concat later)."""
    assert probe.channels is not None and probe.rank is not None  # checked by probes()
    prefix = f"{pre}_stats__{i}"
    return [
        # HardSigmoid(BIG * t + 0) = Clip(BIG * t, 0, 1) in one elementwise pass in the
        # blocked layout: cheaper than the depthwise Conv + Clip it replaced (README)
        helper.make_node(
            "HardSigmoid",
            [probe.tensor],
            [f"{prefix}_on"],
            alpha=_BIG,
            beta=0.0,
            name=f"{prefix}_on",
        ),
        helper.make_node("GlobalAveragePool", [f"{prefix}_on"], [count_name(pre, i)], name=f"{prefix}_mean"),
    ]


def _add_general_probe(graph: onnx.GraphProto, probe: Probe, pre: str, i: int, elem: int, opset: int) -> None:
    """Add the general probe's nodes, constants and its two outputs (count and size) to ``graph``."""
    prefix = f"{pre}_stats__{i}"
    count = count_name(pre, i)
    zero = f"{prefix}_zero"
    graph.initializer.append(helper.make_tensor(zero, elem, [], [0]))
    flat = f"{prefix}_flat"
    if probe.channel_last:
        assert probe.channels is not None  # channel_last is only set for an owned MatMul
        shape = f"{prefix}_shape_last"
        graph.initializer.append(helper.make_tensor(shape, TensorProto.INT64, [2], [-1, probe.channels]))
        axes, axes_name = [0], f"{pre}_axes_0"
    else:
        shape, axes, axes_name = f"{pre}_shape_nc", [0, 2], f"{pre}_axes_02"
    graph.node.extend(
        [
            helper.make_node("Reshape", [probe.tensor, shape], [flat], name=f"{prefix}_reshape"),
            helper.make_node("Greater", [flat, zero], [f"{prefix}_on"], name=f"{prefix}_gt"),
            helper.make_node(
                "Cast", [f"{prefix}_on"], [f"{prefix}_on64"], to=TensorProto.INT64, name=f"{prefix}_cast"
            ),
            _reduce_sum(f"{prefix}_on64", count, axes, axes_name, opset, prefix),
            helper.make_node("Size", [probe.tensor], [size_name(pre, i)], name=f"{prefix}_size"),
        ]
    )
    graph.output.append(helper.make_tensor_value_info(count, TensorProto.INT64, [probe.channels]))
    graph.output.append(helper.make_tensor_value_info(size_name(pre, i), TensorProto.INT64, []))


def _add_fraction_outputs(
    graph: onnx.GraphProto, model: onnx.ModelProto, planned: Sequence[Probe], pre: str
) -> None:
    """Join the fast probes' pooled means per tensor rank into one ``P_on_fraction__r`` output each."""
    for rank, group in fast_groups(planned).items():
        fraction = fraction_name(pre, rank)
        means = [count_name(pre, i) for i in group]
        graph.node.append(helper.make_node("Concat", means, [fraction], axis=1, name=f"{fraction}_concat"))
        dims = [None, sum(planned[i].channels or 0 for i in group), *[1] * (rank - 2)]
        elem = _elem_type(model, planned[group[0]].tensor)
        graph.output.append(helper.make_tensor_value_info(fraction, elem, dims))


def _reduce_sum(
    data: str, out: str, axes: list[int], axes_name: str, opset: int, prefix: str
) -> onnx.NodeProto:
    if opset >= 13:
        return helper.make_node("ReduceSum", [data, axes_name], [out], keepdims=0, name=f"{prefix}_sum")
    return helper.make_node("ReduceSum", [data], [out], axes=axes, keepdims=0, name=f"{prefix}_sum")


def _drop_unused_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes no graph output depends on (the model's head, after the last rectifier).

    A node with a subgraph (Loop, If, Scan) is kept with every outer tensor its bodies read.
    """
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        bodies = subgraphs(node)
        if bodies or any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for body in bodies:
                needed |= graph_names(body)
    kept = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept)
    drop_unread(graph)
