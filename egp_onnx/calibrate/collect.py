"""Statistics pass: per-channel ON counts at each rectifier, reduced inside onnxruntime.

The statistics model (:mod:`egp_onnx.calibrate.probes`) runs batch by batch; only per-channel
figures leave it. Counts are integers, summed over batches: they merge exactly across batches and
shards.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx

from egp_onnx.calibrate.probes import (
    count_name,
    fast_groups,
    fraction_name,
    plan,
    probe_prefix,
    size_name,
    statistics_model,
)
from egp_onnx.entropy import ChannelCounts, Statistics
from egp_onnx.errors import CalibrationError
from egp_onnx.graph.rectifiers import RectifierSite
from egp_onnx.graph.weights import split_weights, static_shapes
from egp_onnx.load.calibration import CalibrationData, InputSpec
from egp_onnx.load.parts import DataPart, part_data, plan_parts
from egp_onnx.load.readers import Batch
from egp_onnx.runtime.cluster import Cluster, worker_cached
from egp_onnx.runtime.session import STATISTICS, Session, make_session, run_session
from egp_onnx.runtime.threads import cores

log = logging.getLogger(__name__)

__all__ = ["ChannelCounts", "PartCounts", "ProbeTotals", "Statistics", "collect_statistics", "count_part"]

#: Batches the statistics pass runs at once, each on its share of the cores (see collect_statistics)
IN_FLIGHT = 2


#: per input shape: the spatial size of every fast probe's channel, and of every probe
_Spatial = tuple[np.ndarray, np.ndarray]


class ProbeTotals:
    """The statistics session(s) of one model; adds each batch's ON counts to running totals.

    The fast probes' channels are laid end to end in one vector, so a batch costs a handful of
    numpy operations whatever the number of probes; the totals are split per site once, at the end.
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
        self.probes, self.index = plan(model, sites, True)
        # The probes go onto the model without its weights (no copy of them); the session gets
        # the weights from memory. Optimised: the probes are built to stay inside onnxruntime's
        # fused, blocked-layout graph.
        self.stubbed, self.weights = split_weights(model, known=known)
        self.fast = make_session(statistics_model(self.stubbed, sites), STATISTICS, self.weights, threads)
        self.general: Session | None = None
        groups = fast_groups(self.probes)
        self.fast_ids = [i for group in groups.values() for i in group]  # the order of their channels
        self.other_ids = [i for i, p in enumerate(self.probes) if not p.fast]
        self.names = [fraction_name(self.prefix, rank) for rank in groups]
        for i in self.other_ids:
            self.names += [count_name(self.prefix, i), size_name(self.prefix, i)]
        widths = [self.probes[i].channels or 0 for i in self.fast_ids]
        self.offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        self.reset()
        self._spatial: dict[tuple[tuple[str, tuple[int, ...]], ...], _Spatial | None] = {}

    def reset(self) -> None:
        """Zero the totals (a cluster worker counts one part after another with one session)."""
        self.on_fast = np.zeros(int(self.offsets[-1]), dtype=np.int64)
        self.on_other: list[np.ndarray | None] = [None for _ in self.probes]
        self.events = np.zeros(len(self.probes), dtype=np.int64)

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
            self.general = make_session(general, STATISTICS, self.weights, self.threads)
        return spatial

    def run(self, feed: dict[str, np.ndarray], spatial: _Spatial | None) -> list[np.ndarray]:
        """The session's outputs for one prepared batch; several batches may run at once."""
        if spatial is None:
            assert self.general is not None  # built by prepare()
            names = [count_name(self.prefix, i) for i in range(len(self.probes))]
            names += [size_name(self.prefix, i) for i in range(len(self.probes))]
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
    cluster: Cluster | None = None,
) -> Statistics:
    """Run the calibration data and count ON events per channel at every site.

    Args:
        model: the (possibly pruned) model, shape-inferred (as load_model returns it).
        sites: the rectifier sites to observe.
        data: calibration data for the model.
        batch_size: samples per onnxruntime call.
        on_batch: called with the number of samples after each batch (progress display).
        known: values of initializers already read from ``model`` (see split_weights).
        cluster: run the data's parts on this Dask cluster (see :func:`count_part`); the counts
            are the same as without it.

    Raises:
        CalibrationError: the data yields no batch, or onnxruntime rejects a batch.

    """
    if not sites:
        return Statistics({}, 0)
    if cluster is not None:
        totals, samples = _on_cluster(cluster, model, sites, data, batch_size, on_batch)
    else:
        # IN_FLIGHT batches run at once, each on its share of the cores: onnxruntime's threads
        # synchronise at every node, which on small convolutions and on the probes' pooling costs
        # more than the work (README, Performance). Counts are integer sums: the order is free.
        runner = ProbeTotals(model, sites, threads=max(1, cores() // IN_FLIGHT), known=known)
        samples = _count(runner, data, batch_size, IN_FLIGHT, on_batch)
        totals = runner.totals()
    if samples == 0:
        raise CalibrationError(
            f"{data.description}: no complete batch (the model's batch size is fixed and larger "
            "than the data)"
        )
    result = {}
    for site, (site_on, total) in zip(sites, totals, strict=True):
        result[site.name] = ChannelCounts(site_on, total)
    return Statistics(result, samples)


def _count(
    runner: ProbeTotals,
    data: CalibrationData,
    batch_size: int,
    in_flight: int,
    on_batch: Callable[[int], None] | None,
) -> int:
    """Add every batch of ``data`` to ``runner``'s totals, ``in_flight`` batches at once; the samples."""
    samples = 0
    pending: deque[tuple[Future[list[np.ndarray]], _Spatial | None, int]] = deque()

    def finish_one() -> None:
        done, spatial, batch = pending.popleft()
        runner.add(done.result(), spatial)
        if on_batch is not None:
            on_batch(batch)

    with ThreadPoolExecutor(in_flight, thread_name_prefix="egp-stats") as pool:
        for feed, _ in data.batches(batch_size):
            spatial = runner.prepare(feed)
            batch = next(iter(feed.values())).shape[0]
            pending.append((pool.submit(runner.run, feed, spatial), spatial, batch))
            samples += batch
            if len(pending) >= in_flight:
                finish_one()
        while pending:
            finish_one()
    return samples


@dataclass(frozen=True)
class PartCounts:
    """What a worker returns for one part: per site (ON counts, events), and the samples counted."""

    totals: list[tuple[np.ndarray, int]]
    samples: int
    unused: int  # samples of the part that do not fill the model's fixed batch size


def count_part(
    model_bytes: bytes,
    loaders: Sequence[Callable[[], tuple[Batch, np.ndarray | None]]],
    version: str,
    sites: Sequence[RectifierSite],
    specs: Sequence[InputSpec],
    description: str,
    loaders_key: str,
    part: DataPart,
    batch_size: int,
    threads: int,
) -> PartCounts:
    """The ON counts of one part of the data, on a cluster worker (Cluster.run_parts).

    The worker builds the statistics session once per model ``version`` and reuses it for every
    part it is given; only the per-channel counts go back.
    """
    # As in one process: IN_FLIGHT batches at once, each on its share of the worker's cores.
    cores_here = threads or cores()
    in_flight = IN_FLIGHT if cores_here >= IN_FLIGHT else 1

    def build() -> tuple[ProbeTotals, threading.Lock]:
        model = onnx.load_from_string(model_bytes)
        return ProbeTotals(model, sites, threads=max(1, cores_here // in_flight)), threading.Lock()

    runner, lock = worker_cached(version, build)
    data = part_data(loaders, loaders_key, specs, description, part)
    with lock:  # a worker with several threads runs its parts one at a time on the one session
        runner.reset()
        samples = _count(runner, data, batch_size, in_flight, None)
        totals = [(on.copy(), events) for on, events in runner.totals()]
    return PartCounts(totals, samples, data.unused)


def _on_cluster(
    cluster: Cluster,
    model: onnx.ModelProto,
    sites: Sequence[RectifierSite],
    data: CalibrationData,
    batch_size: int,
    on_batch: Callable[[int], None] | None,
) -> tuple[list[tuple[np.ndarray, int]], int]:
    """The totals of ``data`` counted part by part on the cluster, merged in the parts' order."""
    parts = plan_parts(data, batch_size)
    log.info("statistics pass: %d parts on %d workers", len(parts), cluster.workers)
    # each worker gets the loaders once per run, and a model version once (a guarded candidate's
    # is there already)
    model_bytes, loaders = cluster.kept_model(model), cluster.kept_once("loaders", data.loaders)
    shared = (model_bytes.key, list(sites), data.specs, data.description, loaders.key)
    done = 0

    def progress(i: int, result: PartCounts) -> None:
        nonlocal done
        done += 1
        log.debug("part %d done (%d of %d)", i, done, len(parts))
        if on_batch is not None:
            on_batch(result.samples)

    items = [(part, batch_size, cluster.threads) for part in parts]
    kept = (model_bytes, loaders)
    results = cluster.run_parts(count_part, kept, shared, items, progress, "statistics pass")
    totals = [(np.zeros_like(on), 0) for on, _ in results[0].totals]
    for result in results:  # in the parts' order (integers: exact in any order, kept for the float sums)
        pairs = zip(totals, result.totals, strict=True)
        totals = [(on + add, events + more) for (on, events), (add, more) in pairs]
    unused = sum(result.unused for result in results)
    if unused and not data.unused:
        data.unused = unused
        log.warning(
            "%s: the model's batch size is fixed: %d samples do not fill a batch and are not used",
            data.description,
            unused,
        )
    return totals, sum(result.samples for result in results)
