"""Latency: two models timed in onnxruntime on the same feeds, run by run in turn."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np
import onnx

from egp_onnx.load.calibration import SampleShape, sample_shape
from egp_onnx.load.readers import Batch
from egp_onnx.report.records import LatencyRecord, Timing
from egp_onnx.runtime.handle import ModelHandle, shapes
from egp_onnx.runtime.session import run_session

#: Per batch size: timed runs of each model stop at MAX_RUNS, or once BUDGET_S seconds have passed
#: and at least MIN_RUNS were timed (so a large model still gets a median and a spread).
LATENCY_BUDGET_S = 1.0
LATENCY_MAX_RUNS = 200
LATENCY_MIN_RUNS = 3
#: Untimed runs of each model per batch size, at least; more while they take under a tenth of the
#: budget (the first runs allocate and plan memory for the new shape). None for a batch whose
#: shapes both sessions have already run (a ModelHandle checked or measured on that data).
LATENCY_WARMUP = 1


def common_feed(feeds: Iterable[Batch]) -> Batch:
    """The largest of ``feeds`` (the first such) of the per-sample shape most samples have.

    Data of many shapes (images of many sizes for a model with symbolic H/W) is timed and costed
    at one stated shape: the one most samples have (the first seen, on a tie). Data of one shape
    gives its first batch: no later batch is larger.
    """
    counts: dict[SampleShape, int] = {}
    largest: dict[SampleShape, Batch] = {}
    for feed in feeds:
        key = sample_shape(feed)  # the key batching uses: batches never mix two of them
        size = _batch_size(feed)
        counts[key] = counts.get(key, 0) + size
        if key not in largest or size > _batch_size(largest[key]):
            largest[key] = feed
    if not largest:
        raise ValueError("common_feed needs at least one feed")
    return largest[max(counts, key=lambda key: counts[key])]  # max keeps the first of equals


def _batch_size(feed: Batch) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 1


def sample_shapes(feed: Batch) -> dict[str, tuple[int, ...]]:
    """The inputs' shapes in ``feed`` at batch size 1."""
    return {name: (1, *array.shape[1:]) for name, array in feed.items()}


def one_sample(feed: Batch) -> Batch:
    """The first sample of ``feed``, as a batch of one."""
    return {name: array[:1] for name, array in feed.items()}


def latency_feeds(model: onnx.ModelProto, feed: Batch) -> list[Batch]:
    """``feed`` cut to batch 1, then ``feed`` itself (its batch), where the model accepts them."""
    batch = next(iter(feed.values())).shape[0] if feed else 1
    first_dims = [i.type.tensor_type.shape.dim[:1] for i in model.graph.input if i.name in feed]
    fixed = [d[0].dim_value for d in first_dims if d and d[0].HasField("dim_value")]
    feeds = []
    if batch > 1 and all(size == 1 for size in fixed):
        feeds.append({k: v[:1] for k, v in feed.items()})
    feeds.append(feed)
    return feeds


def compare_latency(
    before: onnx.ModelProto | ModelHandle,
    after: onnx.ModelProto | ModelHandle,
    feeds: Sequence[Batch],
    budget_s: float = LATENCY_BUDGET_S,
    max_runs: int = LATENCY_MAX_RUNS,
    warmup: int = LATENCY_WARMUP,
) -> Timing:
    """Latency of ``before`` and ``after`` in onnxruntime on each feed, measured run by run in turn.

    Both sessions get the same options (``ORT_ENABLE_ALL``), so the speed-up is over what
    onnxruntime already does. The two models alternate (AB, BA, AB, ... so neither always runs
    second) and share whatever the machine is doing at the time: a busy neighbour slows both alike.
    Neither session's idle threads spin (:data:`egp_onnx.runtime.session.MEASURE`): spinning
    workers of one session would keep the cores busy through the other's runs.
    """
    models = (ModelHandle.of(before), ModelHandle.of(after))
    records = []
    for feed in feeds:
        warm = all(shapes(feed) in m.warm for m in models)
        records.append(_interleaved(models, feed, budget_s, max_runs, warmup, warm))
    stated = sample_shapes(feeds[-1]) if feeds else {}
    return Timing("ORT_ENABLE_ALL", warmup, budget_s, max_runs, tuple(records), stated)


def _interleaved(
    models: tuple[ModelHandle, ModelHandle],
    feed: Batch,
    budget_s: float,
    max_runs: int,
    warmup: int,
    warm: bool = False,
) -> LatencyRecord:
    sessions = [model.session for model in models]  # built before the clock starts
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    done = 0
    while not warm and (done < warmup or (time.perf_counter() - start < budget_s / 10 and done < max_runs)):
        for session in sessions:
            run_session(session, None, feed)
        done += 1
    start = time.perf_counter()
    while len(times[0]) < max_runs and (
        len(times[0]) < LATENCY_MIN_RUNS or time.perf_counter() - start < budget_s
    ):
        order = (0, 1) if len(times[0]) % 2 == 0 else (1, 0)
        for k in order:
            began = time.perf_counter()
            run_session(sessions[k], None, feed)
            times[k].append(time.perf_counter() - began)
    before_ms, after_ms = (np.array(t) * 1000.0 for t in times)
    q_before, q_after = np.percentile(before_ms, [25, 50, 75]), np.percentile(after_ms, [25, 50, 75])
    return LatencyRecord(
        batch_size=int(next(iter(feed.values())).shape[0]) if feed else 1,
        runs=len(before_ms),
        median_ms_before=float(q_before[1]),
        iqr_ms_before=float(q_before[2] - q_before[0]),
        median_ms_after=float(q_after[1]),
        iqr_ms_after=float(q_after[2] - q_after[0]),
        speedup=float(q_before[1] / q_after[1]) if q_after[1] > 0 else float("nan"),
    )
