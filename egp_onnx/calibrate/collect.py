"""Statistics pass: per-channel ON counts at each rectifier, reduced inside onnxruntime.

The statistics model is the user's model with a small probe behind every observed tensor (see
:class:`Probe`). Only per-channel figures leave the graph, so memory stays flat in the number of
samples and no activation is copied out. Counts are integers, summed over batches: they merge
exactly across batches and shards.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from egp_onnx.entropy import ChannelCounts, Statistics
from egp_onnx.errors import CalibrationError, ModelError, one_line
from egp_onnx.graph.topology import IN_MEMORY, RectifierSite, split_weights, static_shapes
from egp_onnx.load.calibration import CalibrationData

log = logging.getLogger(__name__)

__all__ = ["ChannelCounts", "Statistics", "collect_statistics", "make_session", "probes", "run_session"]

#: float32's largest value: HardSigmoid's slope in the fast probe (any positive normal float -> 1)
_BIG = float(np.finfo(np.float32).max)

#: Batches the statistics pass runs at once, each on its share of the cores (see collect_statistics)
IN_FLIGHT = 2


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
    relu_outputs = {n.name: n.output[0] for n in model.graph.node if n.op_type == "Relu"}
    result = []
    for site in sites:
        tensor = relu_outputs.get(site.node, site.input) if site.op_type == "Relu" else site.input
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


def _plan(
    model: onnx.ModelProto, sites: Sequence[RectifierSite], fast: bool
) -> tuple[list[Probe], list[int]]:
    """The distinct probes (sites on slices of one tensor share one) and each site's probe index."""
    unique: dict[Probe, int] = {}
    index = []
    for probe in probes(model, sites, fast):
        index.append(unique.setdefault(probe, len(unique)))
    return list(unique), index


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    """Every node and tensor name of ``graph`` and its subgraphs."""
    names = {t.name for t in graph.initializer} | {v.name for v in [*graph.input, *graph.output]}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
        for body in _subgraphs(node):
            names |= _graph_names(body)
    return names


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    bodies = []
    for attr in node.attribute:
        if attr.type == attr.GRAPH:
            bodies.append(attr.g)
        elif attr.type == attr.GRAPHS:
            bodies.extend(attr.graphs)
    return bodies


def probe_prefix(model: onnx.ModelProto) -> str:
    """A prefix no name of ``model`` starts with: the probe's tensors and nodes cannot collide."""
    names = _graph_names(model.graph)
    prefix, k = "egp", 0
    while any(n.startswith(prefix) for n in names):
        k += 1
        prefix = f"egp{k}x"
    return prefix


def _count_name(prefix: str, i: int) -> str:
    return f"{prefix}_on_count__{i}"


def _size_name(prefix: str, i: int) -> str:
    return f"{prefix}_size__{i}"


def _fraction_name(prefix: str, rank: int) -> str:
    return f"{prefix}_on_fraction__{rank}"


def _fast_groups(probes: Sequence[Probe]) -> dict[int, list[int]]:
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
    planned = _plan(model, sites, fast)[0]
    for i, probe in enumerate(planned):
        prefix = f"{pre}_stats__{i}"
        elem = _elem_type(model, probe.tensor)
        count = _count_name(pre, i)
        if probe.fast:
            assert probe.channels is not None and probe.rank is not None  # checked by probes()
            graph.node.extend(
                [
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
                    helper.make_node("GlobalAveragePool", [f"{prefix}_on"], [count], name=f"{prefix}_mean"),
                ]
            )
            continue
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
                helper.make_node("Size", [probe.tensor], [_size_name(pre, i)], name=f"{prefix}_size"),
            ]
        )
        graph.output.append(helper.make_tensor_value_info(count, TensorProto.INT64, [probe.channels]))
        graph.output.append(helper.make_tensor_value_info(_size_name(pre, i), TensorProto.INT64, []))
    for rank, group in _fast_groups(planned).items():
        fraction = _fraction_name(pre, rank)
        means = [_count_name(pre, i) for i in group]
        graph.node.append(helper.make_node("Concat", means, [fraction], axis=1, name=f"{fraction}_concat"))
        dims = [None, sum(planned[i].channels or 0 for i in group), *[1] * (rank - 2)]
        elem = _elem_type(model, planned[group[0]].tensor)
        graph.output.append(helper.make_tensor_value_info(fraction, elem, dims))
    _drop_unused_nodes(graph)
    return stats


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
        bodies = _subgraphs(node)
        if bodies or any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for body in bodies:
                needed |= _graph_names(body)
    kept = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept)
    dropped = {t.name for t in graph.initializer if t.name not in needed}
    used_inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used_inits)
    # an input that named a dropped initializer (the IR < 4 habit) would become a required feed
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)


def quiet_onnxruntime() -> None:
    """Keep onnxruntime's own warnings (e.g. from sessions that other libraries open) off stderr."""
    ort.set_default_logger_severity(3)


def make_session(
    model: onnx.ModelProto,
    optimize: bool = False,
    lean: bool = False,
    weights: Mapping[str, np.ndarray] | None = None,
    threads: int = 0,
    spinning: bool = True,
) -> ort.InferenceSession:
    """A CPU session; graph optimisation off by default so nothing observed is fused away.

    The weights go to onnxruntime from memory, not inside the serialised model (see
    :func:`egp_onnx.graph.topology.split_weights`): for a 575 MB model that halves the session's build
    time. onnxruntime copies them while it builds the session (``AddExternalInitializers``: "the
    user provided buffers can then be deallocated"), so the session keeps no reference to them and
    they are freed with the caller's last one (``set_providers``, which would read them again, is
    never called on these sessions). ``weights`` gives the values of stubs already in ``model``.
    ``lean`` turns off onnxruntime's memory pattern planning: measured on the calibration benchmark
    it keeps peak memory flat in the number of batches (151-157 MB from 512 to 8192 samples,
    against 193-243 MB with it) at the same speed. ``threads`` is onnxruntime's intra-op thread
    count (0: its default, one per physical core). ``spinning`` False makes its idle worker threads
    sleep at once instead of spinning: two sessions timed in turn then stop taking the cores from
    each other (see egp_onnx.verify.fidelity.compare_latency).
    """
    ort.set_default_logger_severity(3)  # graph warnings come through the default logger, not the session's
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_mem_pattern = not lean
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The weights outside the memory arena, whose chunks round them up: on VGG-19 (575 MB) a session
    # takes 54 MB less, its outputs are the same.
    options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
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


def run_session(
    session: ort.InferenceSession, names: list[str] | None, feed: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """``session.run`` with onnxruntime's failures turned into a one-line CalibrationError."""
    try:
        return list(session.run(names, feed))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeException types
        raise CalibrationError(f"onnxruntime rejected a batch: {one_line(exc)}") from exc


#: per input shape: the spatial size of every fast probe's channel, and of every probe
_Spatial = tuple[np.ndarray, np.ndarray]


class _Runner:
    """The statistics session(s) of one model; adds each batch's ON counts to running totals.

    The fast probes' channels are laid end to end in one vector, so a batch costs a handful of
    numpy operations whatever the number of probes (per probe, on the MobileNet-style benchmark
    model, Python took a fifth of the pass); the totals are split per site once, at the end.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        sites: Sequence[RectifierSite],
        threads: int = 0,
        known: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.model, self.sites, self.threads = model, list(sites), threads
        self.prefix = probe_prefix(model)
        self.probes, self.index = _plan(model, sites, True)
        # The probes go onto the model without its weights (no copy of them); the session gets
        # the weights from memory. Optimised: the probes are built to stay inside onnxruntime's
        # fused, blocked-layout graph.
        self.stubbed, self.weights = split_weights(model, known=known)
        self.fast = make_session(statistics_model(self.stubbed, sites), True, True, self.weights, threads)
        self.general: ort.InferenceSession | None = None
        groups = _fast_groups(self.probes)
        self.fast_ids = [i for group in groups.values() for i in group]  # the order of their channels
        self.other_ids = [i for i, p in enumerate(self.probes) if not p.fast]
        self.names = [_fraction_name(self.prefix, rank) for rank in groups]
        for i in self.other_ids:
            self.names += [_count_name(self.prefix, i), _size_name(self.prefix, i)]
        widths = [self.probes[i].channels or 0 for i in self.fast_ids]
        self.offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        self.on_fast = np.zeros(int(self.offsets[-1]), dtype=np.int64)
        self.on_other: list[np.ndarray | None] = [None for _ in self.probes]
        self.events = np.zeros(len(self.probes), dtype=np.int64)
        self._spatial: dict[tuple[tuple[str, tuple[int, ...]], ...], _Spatial | None] = {}

    def _spatial_sizes(self, feed: dict[str, np.ndarray]) -> _Spatial | None:
        """The spatial sizes for this batch's input shapes (cached); None if they do not resolve.

        Returns the spatial size of every fast probe's channel (laid end to end), and of every
        probe (0 for a general one).
        """
        key = tuple((k, v.shape[1:]) for k, v in feed.items())
        if key not in self._spatial:
            shapes = static_shapes(self.model, {k: (1, *v.shape[1:]) for k, v in feed.items()})
            found = [shapes.get(self.probes[i].tensor) for i in self.fast_ids]
            channels = [self.probes[i].channels for i in self.fast_ids]
            resolved = [f for f, c in zip(found, channels, strict=True) if f and f[1] == c]
            if len(resolved) < len(found):
                self._spatial[key] = None
            else:
                sizes = [int(np.prod(f[2:])) for f in resolved]
                per_probe = np.zeros(len(self.probes), dtype=np.int64)
                per_probe[self.fast_ids] = sizes
                per_channel = np.repeat(np.array(sizes, dtype=np.float64), np.diff(self.offsets))
                self._spatial[key] = (per_channel, per_probe)
        return self._spatial[key]

    def prepare(self, feed: dict[str, np.ndarray]) -> _Spatial | None:
        """The spatial sizes of this batch (None: it goes through the general probes, built here)."""
        spatial = self._spatial_sizes(feed)
        if spatial is None and self.general is None:
            general = statistics_model(self.stubbed, self.sites, fast=False)
            self.general = make_session(general, True, True, self.weights, self.threads)
        return spatial

    def run(self, feed: dict[str, np.ndarray], spatial: _Spatial | None) -> list[np.ndarray]:
        """The session's outputs for one prepared batch; several batches may run at once."""
        if spatial is None:
            assert self.general is not None  # built by prepare()
            names = [_count_name(self.prefix, i) for i in range(len(self.probes))]
            names += [_size_name(self.prefix, i) for i in range(len(self.probes))]
            return run_session(self.general, names, feed)
        return run_session(self.fast, self.names, feed)

    def add(self, results: list[np.ndarray], spatial: _Spatial | None) -> None:
        """Add one batch's ON counts and events (from :meth:`run`) to the totals."""
        if spatial is None:
            count = len(self.probes)
            for i in range(count):
                self._add_other(i, results[i], results[count + i])
            return
        per_channel, per_probe = spatial
        nfast = len(self.names) - 2 * len(self.other_ids)  # one output per tensor rank
        if nfast:
            batch = results[0].shape[0]
            # every fast probe's (N, C) ON fractions side by side; x spatial size, rounded = counts
            flat = [r.reshape(batch, -1) for r in results[:nfast]]
            means = flat[0] if nfast == 1 else np.concatenate(flat, axis=1)
            self.on_fast += np.rint(means * per_channel).sum(axis=0).astype(np.int64)
            self.events += batch * per_probe
        for k, i in enumerate(self.other_ids):
            self._add_other(i, results[nfast + 2 * k], results[nfast + 2 * k + 1])

    def _add_other(self, i: int, count: np.ndarray, size: np.ndarray) -> None:
        """Add a general probe's int64 count and its tensor's size."""
        on = count.astype(np.int64)
        previous = self.on_other[i]
        self.on_other[i] = on if previous is None else previous + on
        self.events[i] += int(size) // max(on.size, 1)

    def totals(self) -> list[tuple[np.ndarray, int]]:
        """(ON counts per channel, events per channel) of every site over the batches added."""
        per_probe = []
        for i in range(len(self.probes)):
            on = self.on_other[i]
            if i in self.fast_ids:
                k = self.fast_ids.index(i)
                fast = self.on_fast[self.offsets[k] : self.offsets[k + 1]]
                on = fast.copy() if on is None else on + fast
            assert on is not None  # a general probe has run at least once when it has no fast one
            per_probe.append((on, int(self.events[i])))
        out = []
        for site, j in zip(self.sites, self.index, strict=True):
            on, total = per_probe[j]
            if site.channels is not None:
                on = on[site.channels[0] : site.channels[1]]
            out.append((on, total))
        return out


def collect_statistics(
    model: onnx.ModelProto,
    sites: Sequence[RectifierSite],
    data: CalibrationData,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    known: Mapping[str, np.ndarray] | None = None,
) -> Statistics:
    """Run the calibration data and count ON events per channel at every site.

    Args:
        model: the (possibly pruned) model, shape-inferred (as load_model returns it).
        sites: the rectifier sites to observe.
        data: calibration data for the model.
        batch_size: samples per onnxruntime call.
        on_batch: called with the number of samples after each batch (progress display).
        known: values of initializers already read from ``model`` (see split_weights).

    Raises:
        CalibrationError: the data yields no batch, or onnxruntime rejects a batch.

    """
    if not sites:
        return Statistics({}, 0)
    # IN_FLIGHT batches run at once, each on its share of the cores: onnxruntime's threads
    # synchronise at every node, which on small convolutions and on the probes' pooling costs
    # more than the work (README, Performance). Counts are integer sums: the order is free.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    runner = _Runner(model, sites, threads=max(1, cores // IN_FLIGHT), known=known)
    samples = 0
    pending: deque[tuple[Future[list[np.ndarray]], _Spatial | None, int]] = deque()

    def finish_one() -> None:
        done, spatial, batch = pending.popleft()
        runner.add(done.result(), spatial)
        if on_batch is not None:
            on_batch(batch)

    with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="egp-stats") as pool:
        for feed, _ in data.batches(batch_size):
            spatial = runner.prepare(feed)
            batch = next(iter(feed.values())).shape[0]
            pending.append((pool.submit(runner.run, feed, spatial), spatial, batch))
            samples += batch
            if len(pending) >= IN_FLIGHT:
                finish_one()
        while pending:
            finish_one()
    if samples == 0:
        raise CalibrationError(
            f"{data.description}: no complete batch (the model's batch size is fixed and larger "
            "than the data)"
        )
    result = {}
    for site, (site_on, total) in zip(sites, runner.totals(), strict=True):
        result[site.name] = ChannelCounts(site_on, total)
    return Statistics(result, samples)
