"""Fidelity: run a reference and a candidate model on the same data and compare their outputs."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import onnx

from egp_onnx.errors import ModelError
from egp_onnx.load.calibration import CalibrationData
from egp_onnx.load.readers import Batch
from egp_onnx.report.records import Fidelity, OutputFidelity
from egp_onnx.runtime.handle import ModelHandle, StoredOutputs


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


def compare(
    reference: onnx.ModelProto | ModelHandle | StoredOutputs,
    candidate: onnx.ModelProto | ModelHandle,
    data: CalibrationData,
    batch_size: int,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Fidelity:
    """Run both models in onnxruntime on ``data`` (streamed) and compare their outputs.

    A reference given as :class:`StoredOutputs` (taken on the same ``data`` and ``batch_size``) is not run.
    """
    cand = ModelHandle.of(candidate)
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
    reference: onnx.ModelProto | ModelHandle | StoredOutputs,
) -> tuple[list[str], Callable[[Batch], list[np.ndarray]]]:
    """The reference's output names, and its outputs batch by batch: run, or the stored ones in turn."""
    if isinstance(reference, StoredOutputs):
        stored = iter(reference.batches)
        return reference.names, lambda feed: next(stored)
    ref = ModelHandle.of(reference)
    names = [o.name for o in ref.session.get_outputs()]
    return names, lambda feed: ref.run(names, feed)


class Reference:
    """A held-out set and the original model's outputs on it, kept in memory.

    The EGP loop checks many candidates against the same original: its outputs are computed once.
    """

    def __init__(self, model: onnx.ModelProto | ModelHandle, data: CalibrationData, batch_size: int) -> None:
        """``model`` as a ModelHandle keeps its session for later use (e.g. the latency measurement)."""
        handle = ModelHandle.of(model)
        self.names = [o.name for o in handle.session.get_outputs()]
        self.batches: list[tuple[Batch, np.ndarray | None, list[np.ndarray]]] = [
            (feed, labels, handle.run(self.names, feed)) for feed, labels in data.batches(batch_size)
        ]

    def evaluate(
        self, candidate: onnx.ModelProto | ModelHandle, atol: float = 1e-5, rtol: float = 1e-5
    ) -> Fidelity:
        """Fidelity of ``candidate`` against the stored outputs."""
        handle = ModelHandle.of(candidate)
        acc = _Accumulator(self.names, atol, rtol)
        for feed, labels, ref in self.batches:
            acc.add(ref, handle.run(self.names, feed), labels)
        return acc.result()

    def classifier(self) -> bool:
        """True when the first output is (N, classes): top-1 agreement is meaningful."""
        first = self.batches[0][2][0]
        return first.ndim == 2 and first.shape[1] > 1

    def head(self, samples: int, elements: int) -> Reference:
        """The same reference on its first samples, cut from its batches (nothing runs again).

        At most ``samples`` samples holding at most ``elements`` input values (at least one sample).
        """
        view = copy.copy(self)
        view.batches, count, size = [], 0, 0
        for feed, labels, outputs in self.batches:
            per_sample = max(1, sum(int(np.prod(a.shape[1:])) for a in feed.values()))
            room = min(samples - count, (elements - size) // per_sample)
            take = min(len(next(iter(feed.values()))), room if view.batches else max(room, 1))
            if take <= 0:
                break
            cut = None if labels is None else labels[:take]
            view.batches.append(({k: a[:take] for k, a in feed.items()}, cut, [o[:take] for o in outputs]))
            count, size = count + take, size + take * per_sample
        return view

    def first_feed(self) -> Batch:
        """One batch, for latency measurements."""
        return self.batches[0][0]
