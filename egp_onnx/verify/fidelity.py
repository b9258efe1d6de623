"""Fidelity: run a reference and a candidate model on the same data and compare their outputs.

Also the latency measurement, the other place where egp-onnx runs models for the user.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from egp_onnx.calibrate.collect import make_session, run_session
from egp_onnx.errors import ModelError
from egp_onnx.graph.topology import initializer_counts, serialized_size, split_weights
from egp_onnx.load.calibration import Batch, CalibrationData
from egp_onnx.report.records import Fidelity, LatencyRecord, OutputFidelity, Timing


class Prepared:
    """A model and its optimised onnxruntime session, built on first use and reused after.

    For a model that several comparisons run (the rewritten model: checked against the pruned
    one, measured on the held-out data, timed): each session costs about a second per 500 MB.
    Its worker threads do not spin (as every session :func:`compare_latency` times).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        split: tuple[onnx.ModelProto, dict[str, np.ndarray]] | None = None,
        known: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Keep ``model``; its session is built on first use.

        ``split`` is ``split_weights(model)`` when the caller has made it; ``known``, values of some
        of the model's initializers already read (see :func:`egp_onnx.graph.topology.split_weights`).
        Either saves reading and copying the same weights again. Neither is kept once the session
        is built: onnxruntime holds its own copy of the weights.
        """
        self.model = model
        self._split = split
        self._known = known
        self._session: ort.InferenceSession | None = None
        #: The model's :func:`egp_onnx.graph.topology.initializer_counts`, taken while the session is built
        #: (from the arrays it is built from: the cost figures need no second read of the weights).
        self.counts: dict[str, tuple[bool, int, int]] = {}
        self.warm: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()  # input shapes its session has run

    @property
    def session(self) -> ort.InferenceSession:
        """The session (built now if not yet)."""
        if self._session is None:
            stubbed, weights = self._split or split_weights(self.model, known=self._known)
            self._split = self._known = None
            self._session = make_session(stubbed, optimize=True, spinning=False, weights=weights)
            self.counts = initializer_counts(self.model, weights)
        return self._session

    def run(self, names: list[str] | None, feed: Batch) -> list[np.ndarray]:
        """Run one batch; its input shapes are remembered (the session has planned its memory for them)."""
        outputs = run_session(self.session, names, feed)
        self.warm.add(_shapes(feed))
        return outputs

    def release(self) -> None:
        """Let the session go (it holds a copy of the weights); it is built again if used again."""
        self._session = None
        self.warm = set()


def _shapes(feed: Batch) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((name, tuple(array.shape)) for name, array in feed.items()))


def _prepared(model: onnx.ModelProto | Prepared) -> Prepared:
    return model if isinstance(model, Prepared) else Prepared(model)


class _Accumulator:
    """Sums of squares, maxima and top-1 matches, batch by batch."""

    def __init__(self, names: list[str], atol: float, rtol: float) -> None:
        self.names, self.atol, self.rtol = names, atol, rtol
        self.diff_sq = np.zeros(len(names))
        self.ref_sq = np.zeros(len(names))
        self.max_abs = np.zeros(len(names))
        self.close = np.ones(len(names), dtype=bool)
        self.agree = self.classified = self.samples = 0
        self.correct_ref = self.correct_cand = self.labelled = 0

    def add(self, ref: list[np.ndarray], cand: list[np.ndarray], labels: np.ndarray | None) -> None:
        for i, (r, c) in enumerate(zip(ref, cand, strict=True)):
            r64, c64 = np.asarray(r, np.float64), np.asarray(c, np.float64)
            if r64.shape != c64.shape:
                self.diff_sq[i] = self.max_abs[i] = np.inf
                self.close[i] = False
                continue
            diff = np.abs(r64 - c64)
            self.diff_sq[i] += float((diff**2).sum())
            self.ref_sq[i] += float((r64**2).sum())
            if diff.size:
                self.max_abs[i] = max(self.max_abs[i], float(diff.max()))
            self.close[i] &= bool((diff <= self.atol + self.rtol * np.abs(r64)).all())
        first_ref, first_cand = np.asarray(ref[0]), np.asarray(cand[0])
        batch = first_ref.shape[0] if first_ref.ndim else 1
        self.samples += batch
        if first_ref.ndim == 2 and first_ref.shape[1] > 1 and first_cand.shape == first_ref.shape:
            pred_ref, pred_cand = first_ref.argmax(1), first_cand.argmax(1)
            self.agree += int((pred_ref == pred_cand).sum())
            self.classified += batch
            if labels is not None:
                self.correct_ref += int((pred_ref == labels).sum())
                self.correct_cand += int((pred_cand == labels).sum())
                self.labelled += batch

    def result(self) -> Fidelity:
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(
                self.ref_sq > 0,
                np.sqrt(self.diff_sq / np.where(self.ref_sq > 0, self.ref_sq, 1)),
                np.sqrt(self.diff_sq),
            )
        outputs = tuple(
            OutputFidelity(n, float(rel[i]), float(self.max_abs[i]), bool(self.close[i]))
            for i, n in enumerate(self.names)
        )
        return Fidelity(
            top1_agreement=self.agree / self.classified if self.classified else None,
            rel_error=float(rel.max()) if rel.size else 0.0,
            max_abs_error=float(self.max_abs.max()) if self.max_abs.size else 0.0,
            accuracy_before=self.correct_ref / self.labelled if self.labelled else None,
            accuracy_after=self.correct_cand / self.labelled if self.labelled else None,
            samples=self.samples,
            outputs=outputs,
        )


class Outputs:
    """A model's outputs on every batch of streamed data, kept in memory (the data is not).

    Compared with a candidate in place of the model itself, they let the model's session go before
    the candidate's is built (graph surgery's check: the pruned and the rewritten model).
    """

    def __init__(self, names: list[str], batches: list[list[np.ndarray]]) -> None:
        self.names, self.batches = names, batches

    @classmethod
    def instead_of(
        cls, model: onnx.ModelProto | Prepared, data: CalibrationData, batch_size: int
    ) -> Outputs | Prepared:
        """``model``'s outputs on ``data``, its session let go; ``model`` if they outweigh its weights.

        A session holds a copy of the weights (more, once onnxruntime has packed them): VGG-19's
        takes 0.7 GB. It is built again if the model is run later.
        """
        prepared = _prepared(model)
        limit = serialized_size(prepared.model)
        names = [o.name for o in prepared.session.get_outputs()]
        batches, size = [], 0
        for feed, _ in data.batches(batch_size):
            outputs = prepared.run(names, feed)
            size += sum(np.asarray(o).nbytes for o in outputs)
            if size > limit:
                return prepared
            batches.append(outputs)
        prepared.release()
        return cls(names, batches)


def compare(
    reference: onnx.ModelProto | Prepared | Outputs,
    candidate: onnx.ModelProto | Prepared,
    data: CalibrationData,
    batch_size: int,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Fidelity:
    """Run both models in onnxruntime on ``data`` (streamed) and compare their outputs.

    A reference given as :class:`Outputs` (taken on the same ``data`` and ``batch_size``) is not run.
    """
    cand = _prepared(candidate)
    names, expected = _expected(reference)
    found = [o.name for o in cand.session.get_outputs()]
    missing = [n for n in names if n not in found]
    if missing:
        raise ModelError(
            f"the models' outputs differ: the compressed model has no output {', '.join(missing)} "
            f"(its outputs: {', '.join(found)}); outputs are compared by name"
        )
    acc = _Accumulator(names, atol, rtol)
    for feed, labels in data.batches(batch_size):
        acc.add(expected(feed), cand.run(names, feed), labels)
    return acc.result()


def _expected(
    reference: onnx.ModelProto | Prepared | Outputs,
) -> tuple[list[str], Callable[[Batch], list[np.ndarray]]]:
    """The reference's output names, and its outputs batch by batch: run, or the stored ones in turn."""
    if isinstance(reference, Outputs):
        stored = iter(reference.batches)
        return reference.names, lambda feed: next(stored)
    ref = _prepared(reference)
    names = [o.name for o in ref.session.get_outputs()]
    return names, lambda feed: ref.run(names, feed)


class Reference:
    """A held-out set and the original model's outputs on it, kept in memory.

    The EGP loop checks many candidates against the same original: its outputs are computed once.
    """

    def __init__(self, model: onnx.ModelProto | Prepared, data: CalibrationData, batch_size: int) -> None:
        """``model`` as a Prepared one keeps its session for later use (e.g. the latency measurement)."""
        prepared = _prepared(model)
        self.names = [o.name for o in prepared.session.get_outputs()]
        self.batches: list[tuple[Batch, np.ndarray | None, list[np.ndarray]]] = [
            (feed, labels, prepared.run(self.names, feed)) for feed, labels in data.batches(batch_size)
        ]

    def evaluate(
        self, candidate: onnx.ModelProto | Prepared, atol: float = 1e-5, rtol: float = 1e-5
    ) -> Fidelity:
        """Fidelity of ``candidate`` against the stored outputs."""
        prepared = _prepared(candidate)
        acc = _Accumulator(self.names, atol, rtol)
        for feed, labels, ref in self.batches:
            acc.add(ref, prepared.run(self.names, feed), labels)
        return acc.result()

    def classifier(self) -> bool:
        """True when the first output is (N, classes): top-1 agreement is meaningful."""
        first = self.batches[0][2][0]
        return first.ndim == 2 and first.shape[1] > 1

    def first_feed(self) -> Batch:
        """One batch, for latency measurements."""
        return self.batches[0][0]


#: Per batch size: timed runs of each model stop at MAX_RUNS, or once BUDGET_S seconds have passed
#: and at least MIN_RUNS were timed (so a large model still gets a median and a spread).
LATENCY_BUDGET_S = 1.0
LATENCY_MAX_RUNS = 200
LATENCY_MIN_RUNS = 3
#: Untimed runs of each model per batch size, at least; more while they take under a tenth of the
#: budget (the first runs allocate and plan memory for the new shape). None for a batch whose
#: shapes both sessions have already run (a Prepared model checked or measured on that data).
LATENCY_WARMUP = 1


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
    before: onnx.ModelProto | Prepared,
    after: onnx.ModelProto | Prepared,
    feeds: Sequence[Batch],
    budget_s: float = LATENCY_BUDGET_S,
    max_runs: int = LATENCY_MAX_RUNS,
    warmup: int = LATENCY_WARMUP,
) -> Timing:
    """Latency of ``before`` and ``after`` in onnxruntime on each feed, measured run by run in turn.

    Both sessions get the same options (``ORT_ENABLE_ALL``), so the speed-up is over what
    onnxruntime already does. The two models alternate (AB, BA, AB, ... so neither always runs
    second) and share whatever the machine is doing at the time: a busy neighbour slows both alike.
    Neither session's idle threads spin: with spinning (onnxruntime's default) each session's
    workers kept the cores busy through the other's runs, and on 2 cores a model timed against a
    copy of itself read up to 5.9% apart, each run up to twice its time alone (resnet4x32, batch
    32: 55-70 ms against 31 ms); without, 1-3% apart at 36-38 ms.
    """
    models = (_prepared(before), _prepared(after))
    records = []
    for feed in feeds:
        warm = all(_shapes(feed) in m.warm for m in models)
        sessions = (models[0].session, models[1].session)
        records.append(_interleaved(sessions, feed, budget_s, max_runs, warmup, warm))
    return Timing("ORT_ENABLE_ALL", warmup, budget_s, max_runs, tuple(records))


def _interleaved(
    sessions: tuple[ort.InferenceSession, ort.InferenceSession],
    feed: Batch,
    budget_s: float,
    max_runs: int,
    warmup: int,
    warm: bool = False,
) -> LatencyRecord:
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

