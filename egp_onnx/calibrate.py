"""Statistics pass: per-channel ON counts at each rectifier input, reduced inside onnxruntime.

The statistics model is the user's model with, behind every observed tensor z, the nodes
``ReduceSum(Cast(Greater(Reshape(z), 0)))`` and ``Size(z)``. Only these small outputs leave the
graph, so memory stays flat in the number of samples and no activation is copied out. Counts are
integers, summed over batches: they merge exactly across batches and shards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from egp_onnx.data import CalibrationData
from egp_onnx.errors import CalibrationError, ModelError
from egp_onnx.io import one_line
from egp_onnx.topology import RectifierSite

log = logging.getLogger(__name__)

_COUNT = "egp_on_count__{}"
_SIZE = "egp_size__{}"


@dataclass(frozen=True)
class ChannelCounts:
    """ON events per channel of one rectifier input, over the whole calibration set."""

    on: np.ndarray  # int64, shape (C,)
    total: int  # events per channel (samples x spatial positions)

    def merged(self, other: ChannelCounts) -> ChannelCounts:
        """Counts of two disjoint data sets together."""
        return ChannelCounts(self.on + other.on, self.total + other.total)


@dataclass(frozen=True)
class Statistics:
    """Counts per rectifier name, and how many samples produced them."""

    counts: dict[str, ChannelCounts]
    samples: int


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _elem_type(model: onnx.ModelProto, tensor: str) -> int:
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if value.name == tensor and value.type.tensor_type.elem_type:
            return int(value.type.tensor_type.elem_type)
    return TensorProto.FLOAT


def statistics_model(model: onnx.ModelProto, sites: Sequence[RectifierSite]) -> onnx.ModelProto:
    """The model whose only outputs are the per-channel ON counts and sizes of ``sites``."""
    stats = onnx.ModelProto()
    stats.CopyFrom(model)
    graph = stats.graph
    opset = _opset(model)
    del graph.output[:]
    graph.initializer.append(helper.make_tensor("egp_shape_nc", TensorProto.INT64, [3], [0, 0, -1]))
    if opset >= 13:
        graph.initializer.append(helper.make_tensor("egp_axes_02", TensorProto.INT64, [2], [0, 2]))
        graph.initializer.append(helper.make_tensor("egp_axes_0", TensorProto.INT64, [1], [0]))
    for i, site in enumerate(sites):
        elem = _elem_type(model, site.input)
        zero = f"egp_zero__{i}"
        graph.initializer.append(helper.make_tensor(zero, elem, [], [0]))
        flat = f"egp_flat__{i}"
        if site.channel_last:
            assert site.owner is not None  # channel_last is only set for an owned MatMul
            shape = f"egp_shape_last__{i}"
            graph.initializer.append(
                helper.make_tensor(shape, TensorProto.INT64, [2], [-1, site.owner.out_channels])
            )
            axes, axes_name = [0], "egp_axes_0"
        else:
            shape, axes, axes_name = "egp_shape_nc", [0, 2], "egp_axes_02"
        prefix = f"egp_stats__{i}"
        graph.node.extend(
            [
                helper.make_node("Reshape", [site.input, shape], [flat], name=f"{prefix}_reshape"),
                helper.make_node("Greater", [flat, zero], [f"{prefix}_on"], name=f"{prefix}_gt"),
                helper.make_node(
                    "Cast",
                    [f"{prefix}_on"],
                    [f"{prefix}_on64"],
                    to=TensorProto.INT64,
                    name=f"{prefix}_cast",
                ),
                _reduce_sum(f"{prefix}_on64", _COUNT.format(i), axes, axes_name, opset, prefix),
                helper.make_node("Size", [site.input], [_SIZE.format(i)], name=f"{prefix}_size"),
            ]
        )
        channels = site.owner.out_channels if site.owner else None
        graph.output.append(helper.make_tensor_value_info(_COUNT.format(i), TensorProto.INT64, [channels]))
        graph.output.append(helper.make_tensor_value_info(_SIZE.format(i), TensorProto.INT64, []))
    _drop_unused_nodes(graph)
    return stats


def _reduce_sum(
    data: str, out: str, axes: list[int], axes_name: str, opset: int, prefix: str
) -> onnx.NodeProto:
    if opset >= 13:
        return helper.make_node("ReduceSum", [data, axes_name], [out], keepdims=0, name=f"{prefix}_sum")
    return helper.make_node("ReduceSum", [data], [out], axes=axes, keepdims=0, name=f"{prefix}_sum")


def _drop_unused_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes no graph output depends on (the model's head, after the last rectifier)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        has_subgraph = any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)
        if has_subgraph or any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    kept = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept)
    used_inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used_inits)


def make_session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    """A CPU session; graph optimisation off by default so nothing observed is fused away."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        raise ModelError(f"onnxruntime cannot load the model: {one_line(exc)}") from exc


def run_session(
    session: ort.InferenceSession, names: list[str] | None, feed: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """``session.run`` with onnxruntime's failures turned into a one-line CalibrationError."""
    try:
        return list(session.run(names, feed))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeException types
        raise CalibrationError(f"onnxruntime rejected a batch: {one_line(exc)}") from exc


def collect_statistics(
    model: onnx.ModelProto,
    sites: Sequence[RectifierSite],
    data: CalibrationData,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> Statistics:
    """Run the calibration data and count ON events per channel at every site.

    Args:
        model: the (possibly pruned) model.
        sites: the rectifier sites to observe.
        data: calibration data for the model.
        batch_size: samples per onnxruntime call.
        on_batch: called with the number of samples after each batch (progress display).

    Raises:
        CalibrationError: the data yields no batch, or onnxruntime rejects a batch.

    """
    if not sites:
        return Statistics({}, 0)
    session = make_session(statistics_model(model, sites))
    names = [o.name for o in session.get_outputs()]
    on = [np.zeros(0, dtype=np.int64) for _ in sites]
    sizes = [0 for _ in sites]
    samples = 0
    for feed, _ in data.batches(batch_size):
        results = dict(zip(names, run_session(session, names, feed), strict=True))
        for i in range(len(sites)):
            counts = results[_COUNT.format(i)].astype(np.int64)
            on[i] = counts if on[i].size == 0 else on[i] + counts
            sizes[i] += int(results[_SIZE.format(i)])
        batch = next(iter(feed.values())).shape[0]
        samples += batch
        if on_batch is not None:
            on_batch(batch)
    if samples == 0:
        raise CalibrationError(
            f"{data.description}: no complete batch (the model's batch size is fixed and larger "
            "than the data)"
        )
    counts = {}
    for site, site_on, size in zip(sites, on, sizes, strict=True):
        channels = max(site_on.size, 1)
        counts[site.name] = ChannelCounts(site_on, size // channels)
    return Statistics(counts, samples)
