"""Fidelity: run a reference and a candidate model on the same data and compare their outputs.

Every output is compared by the rule for its kind (:func:`output_kind`): classifier outputs
(N, classes) by argmax agreement per sample, sequence outputs (N, T, classes) by the agreement of
their greedy CTC readings per sample (:func:`sequence_agreement`),
probability maps (values in [0, 1], a detector's or segmenter's Sigmoid output) by what a
pipeline does with them: the regions above a threshold, compared per sample by their IoU; other
maps and tensors by relative L2 error and an element-wise test whose absolute tolerance never
exceeds a small fraction of the output's own magnitude (so that a map of near-zero values is
judged on its values, not waved through by the tolerance).

Held-out data cut from the calibration set is easier than unseen data: the original is confident
there, so its answers flip later than on unseen inputs near its decision boundaries. The estimate
of unseen agreement therefore counts a sample as flipped when the candidate moves its logits
toward another class by more than :data:`MARGIN_SCALE` times the original's margin to it, i.e.
the agreement the candidate would have if the original were a little less sure
(benchmarks/guard.py measures the rule against unseen test sets). Data the user marks as unseen
is used as is.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from egp_onnx.config import DEFAULT_MAP_THRESHOLD
from egp_onnx.errors import ModelError
from egp_onnx.load.calibration import CalibrationData
from egp_onnx.load.parts import batch_parts
from egp_onnx.load.readers import Batch
from egp_onnx.report.records import Fidelity, OutputFidelity
from egp_onnx.runtime.handle import ModelHandle, StoredOutputs

#: A sample (or position) counts as flipped for the estimate of unseen agreement when the
#: candidate's logit of some class j gains more than this times the original's margin
#: z_c - z_j on the original's class c. 1 is plain agreement. Chosen by benchmarks/guard.py:
#: over the candidates the guarded runs judged on the digits and MNIST samples, plain agreement
#: on the held-out split overstates unseen agreement by 0.4 pt on average; at 0.9, by -0.1 to
#: +0.2 pt where unseen agreement is >= 0.975 (README, "The guard").
MARGIN_SCALE = 0.9
#: The element-wise test's absolute tolerance is at most this fraction of the output's largest
#: magnitude in the batch: on a map of values ~1e-6 an atol of 1e-4 would pass any change (all
#: values doubled: a relative error of 1), while the original's own rounding of such a map
#: (tests/surgery/test_surgery_check.py: 1e-7 on values of 1e-6, 0.27 relative) must pass.
SIGNAL_FRACTION = 0.5
#: z of the two-sided 95% interval given for the estimate (Wilson score interval).
INTERVAL_Z = 1.96

CLASSES, SEQUENCE, MAP, TENSOR = "classes", "sequence", "map", "tensor"
#: A map whose values all lie in [0, 1] on the held-out data: judged by its thresholded regions.
PROBABILITY = "probability"
#: How far outside [0, 1] a probability map's values may stray (a Sigmoid's float rounding).
PROBABILITY_SLACK = 1e-6


def output_kind(shape: tuple[int, ...], values: np.ndarray | None = None) -> str:
    """The rule an output of ``shape`` (batch first) is judged by; ``values``: the original's, if known.

    ``classes``: (N, C) with C > 1, top-1 agreement per sample; ``sequence``: (N, T, C) with
    C > 1 whose rows are probability distributions or their logarithms (a recogniser's softmax
    or CTC log-softmax; a detector's (N, anchors, 4 + classes) is not one), agreement of the greedy
    readings per sample; ``probability``: any other output of rank >= 3 whose values lie in [0, 1] (a text
    detector's or segmenter's probability map), IoU of the regions above a threshold per sample;
    ``map``: any other output of rank >= 3 (feature maps, regressions); ``tensor``: the rest.
    Maps and tensors: relative L2 error.
    """
    if len(shape) == 2 and shape[1] > 1:
        return CLASSES
    if len(shape) == 3 and shape[2] > 1 and values is not None and _distributions(values):
        return SEQUENCE
    if len(shape) >= 3:
        return PROBABILITY if values is not None and probabilities(values) else MAP
    return TENSOR


def probabilities(values: np.ndarray) -> bool:
    """True when every value lies in [0, 1] (up to :data:`PROBABILITY_SLACK`)."""
    v = np.asarray(values)
    if not v.size or not np.isfinite(v).all():
        return False
    return bool(v.min() >= -PROBABILITY_SLACK and v.max() <= 1 + PROBABILITY_SLACK)


def region_iou(ref: np.ndarray, cand: np.ndarray, threshold: float) -> np.ndarray:
    """Per sample (first axis): IoU of the elements above ``threshold`` in ``ref`` and in ``cand``.

    1 where neither has any (a page without text, read as such by both). A candidate's NaN or
    Inf counts as the opposite of the original's answer there.
    """
    n = ref.shape[0] if ref.ndim else 1
    a = (ref > threshold).reshape(n, -1)
    b = np.where(np.isfinite(cand), cand > threshold, ~(ref > threshold)).reshape(n, -1)
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _distributions(values: np.ndarray) -> bool:
    """True when every row along the last axis is a probability distribution or its logarithm."""
    v = np.asarray(values, np.float64)
    if not v.size or not np.isfinite(v).all():
        return False
    if v.min() >= -1e-6 and np.allclose(v.sum(-1), 1.0, atol=1e-3):
        return True
    return bool(v.max() <= 1e-6 and np.allclose(np.exp(v).sum(-1), 1.0, atol=1e-3))


def scaled_flips(ref: np.ndarray, cand: np.ndarray, scale: float) -> np.ndarray:
    """Per row of (rows, classes): True where the candidate moved some class j far toward the top one.

    Far: the original's margin ``z_c - z_j`` to its top class c shrank by more than ``scale``
    times itself. ``scale = 1`` is a plain flip of the top-1 answer (ties aside).
    """
    return np.asarray(_overshoot(ref, cand, scale).max(1) > 0)


def _overshoot(ref: np.ndarray, cand: np.ndarray, scale: float) -> np.ndarray:
    """Per row and class j: how far the candidate moved j toward the original's top class.

    Beyond ``scale`` times the original's margin to it: > 0 is a flip under ``scale``; the top
    class itself reads -inf.
    """
    rows = np.arange(ref.shape[0])
    top = ref.argmax(1)
    margin = ref[rows, top][:, None] - ref  # >= 0
    gain = (cand - cand[rows, top][:, None]) + margin  # how far each class moved toward the top one
    over = gain - scale * margin
    over[rows, top] = -np.inf
    return over


def greedy_decode(path: np.ndarray, blank: int) -> np.ndarray:
    """A CTC head's greedy reading of one argmax path: repeats collapsed, then the blank dropped."""
    start = np.ones(len(path), dtype=bool)
    start[1:] = path[1:] != path[:-1]
    runs = path[start]
    return runs[runs != blank]


def sequence_agreement(ref: np.ndarray, cand: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence of (N, T, classes): the same greedy reading, plainly and under ``scale``.

    A recogniser's (N, T, classes) output is read by its decoder, not position by position: a
    CTC head's positions are mostly its blank, and a character's edges move between it and the
    blank without changing the reading. So a sequence agrees when the candidate's greedy decode
    (:func:`greedy_decode`) equals the original's, the blank being the class the original's path
    holds most (a CTC head's blank); it is kept (the estimate's count) when it still does with
    every position that flips under ``scale`` (:func:`scaled_flips`) turned to the class that
    flips it. An output decoded otherwise (one label per position) is judged more leniently.
    """
    agree = np.zeros(ref.shape[0], dtype=bool)
    kept = np.zeros(ref.shape[0], dtype=bool)
    for n in range(ref.shape[0]):
        path, moved = ref[n].argmax(1), cand[n].argmax(1)
        blank = int(np.bincount(path).argmax())
        reading = greedy_decode(path, blank)
        agree[n] = np.array_equal(greedy_decode(moved, blank), reading)
        over = _overshoot(ref[n], cand[n], scale)
        flipped = over.max(1) > 0
        rival = np.where(flipped, over.argmax(1), moved)
        kept[n] = agree[n] and np.array_equal(greedy_decode(rival, blank), reading)
    return agree, kept


def jeffreys_mean(successes: int, n: int) -> float:
    """(successes + 1/2) / (n + 1): the posterior mean of a proportion under Jeffreys' prior.

    Unlike successes / n it does not claim 1 from a sample with no failure (0 flips of 256 read
    0.998, not 1).
    """
    return (successes + 0.5) / (n + 1)


def wilson_interval(successes: float, n: int, z: float = INTERVAL_Z) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    denominator = 1 + z * z / n
    return max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator)


@dataclass
class _RegionSums:
    """A probability map's per-sample region IoUs, summed: their mean, spread and worst."""

    samples: int = 0
    total: float = 0.0
    squares: float = 0.0
    worst: float = 1.0

    def add(self, iou: np.ndarray) -> None:
        if iou.size:
            self.samples += int(iou.size)
            self.total += float(iou.sum())
            self.squares += float((iou**2).sum())
            self.worst = min(self.worst, float(iou.min()))

    def merge(self, other: _RegionSums) -> None:
        self.samples += other.samples
        self.total += other.total
        self.squares += other.squares
        self.worst = min(self.worst, other.worst)

    def mean(self) -> float:
        return self.total / self.samples

    def standard_error(self) -> float:
        """Of the mean, from the samples' spread (0 from a single sample)."""
        n = self.samples
        if n < 2:
            return 0.0
        variance = max(self.squares - self.total**2 / n, 0.0) / (n - 1)
        return math.sqrt(variance / n)


@dataclass
class _OutputSums:
    """One output's sums over the batches seen: errors, and argmax counts for classes and sequences."""

    kind: str = ""
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    max_abs: float = 0.0
    close: bool = True
    positions: int = 0  # samples compared by argmax (a sequence is one, read by its greedy decode)
    agree: int = 0
    kept: int = 0  # rows not flipped under MARGIN_SCALE
    mismatched: bool = False  # the two models' shapes differ
    threshold: float = DEFAULT_MAP_THRESHOLD  # probability maps: where regions are cut
    regions: _RegionSums = field(default_factory=_RegionSums)

    def add(self, ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> None:
        if not self.kind:
            self.kind = output_kind(ref.shape, ref)
        elif self.kind == PROBABILITY and not probabilities(ref):
            self.kind = MAP  # probabilities on every batch, or a map
        if ref.shape != cand.shape:
            self.mismatched, self.close = True, False
            self.diff_sq = self.max_abs = math.inf
            self.regions.add(np.zeros(ref.shape[0] if ref.ndim else 1))
            return
        r64, c64 = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
        # Equal values (an Inf included) and NaN where the reference has NaN are no difference;
        # a NaN or Inf on one side only is an infinite one. The reference's size counts its
        # finite values.
        same = (r64 == c64) | (np.isnan(r64) & np.isnan(c64))
        finite = np.where(np.isfinite(r64), r64, 0.0)
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.nan_to_num(np.abs(r64 - c64), nan=np.inf))
        self.diff_sq += float((diff**2).sum())
        self.ref_sq += float((finite**2).sum())
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            signal = float(np.abs(finite).max())
            tolerance = min(atol, SIGNAL_FRACTION * signal)
            with np.errstate(invalid="ignore"):
                self.close &= bool((same | (diff <= tolerance + rtol * np.abs(r64))).all())
        if self.kind == CLASSES and r64.size:
            self.positions += r64.shape[0]
            self.agree += int((r64.argmax(1) == c64.argmax(1)).sum())
            self.kept += int((~scaled_flips(r64, c64, MARGIN_SCALE)).sum())
        if self.kind == SEQUENCE and r64.size:
            agree, kept = sequence_agreement(r64, c64, MARGIN_SCALE)
            self.positions += r64.shape[0]
            self.agree += int(agree.sum())
            self.kept += int(kept.sum())
        if self.kind == PROBABILITY:
            self.regions.add(region_iou(r64, c64, self.threshold))

    def merge(self, other: _OutputSums) -> None:
        self.kind = MAP if MAP in (self.kind, other.kind) else self.kind or other.kind
        self.regions.merge(other.regions)
        self.diff_sq += other.diff_sq
        self.ref_sq += other.ref_sq
        self.max_abs = max(self.max_abs, other.max_abs)
        self.close &= other.close
        self.positions += other.positions
        self.agree += other.agree
        self.kept += other.kept
        self.mismatched |= other.mismatched

    def rel_error(self) -> float:
        if self.ref_sq > 0:
            return math.sqrt(self.diff_sq / self.ref_sq)
        return math.sqrt(self.diff_sq)


@dataclass
class FidelitySums:
    """Sums over batches, output by output, and the labels' counts.

    :meth:`result` turns them into a :class:`Fidelity`; sums of disjoint batches merge
    (:meth:`merge`), in any order. ``unseen``: the data are unseen by the model's training, so
    the estimate is the agreement as is.
    """

    names: list[str]
    atol: float
    rtol: float
    unseen: bool = False
    outputs: list[_OutputSums] = field(default_factory=list)
    threshold: float = DEFAULT_MAP_THRESHOLD  # where probability maps are cut into regions
    samples: int = 0
    correct_ref: int = 0
    correct_cand: int = 0
    labelled: int = 0

    def __post_init__(self) -> None:
        if not self.outputs:
            self.outputs = [_OutputSums(threshold=self.threshold) for _ in self.names]

    def add(self, ref: list[np.ndarray], cand: list[np.ndarray], labels: np.ndarray | None) -> None:
        """Add one batch: both models' outputs in ``names`` order, and the batch's labels if any."""
        for sums, r, c in zip(self.outputs, ref, cand, strict=True):
            sums.add(np.asarray(r), np.asarray(c), self.atol, self.rtol)
        first = np.asarray(ref[0])
        batch = first.shape[0] if first.ndim else 1
        self.samples += batch
        judged = self._first_classes()
        if labels is not None and judged is not None:
            pred_ref = np.asarray(ref[judged]).argmax(-1)
            pred_cand = np.asarray(cand[judged]).argmax(-1)
            if pred_ref.shape == pred_cand.shape == np.shape(labels):
                self.correct_ref += int((pred_ref == labels).sum())
                self.correct_cand += int((pred_cand == labels).sum())
                self.labelled += batch

    def merge(self, other: FidelitySums) -> FidelitySums:
        """Add the sums of other batches (of the same outputs, tolerances and kind of data)."""
        for mine, theirs in zip(self.outputs, other.outputs, strict=True):
            mine.merge(theirs)
        self.samples += other.samples
        self.correct_ref += other.correct_ref
        self.correct_cand += other.correct_cand
        self.labelled += other.labelled
        return self

    def _first_classes(self) -> int | None:
        return next((i for i, o in enumerate(self.outputs) if o.kind == CLASSES and not o.mismatched), None)

    def result(self) -> Fidelity:
        """The comparison's figures; the estimate of unseen agreement is the first classes output's."""
        outputs = tuple(self._output(name, sums) for name, sums in zip(self.names, self.outputs, strict=True))
        rel = [o.rel_error for o in outputs]
        judged = self._first_classes()
        first = outputs[judged] if judged is not None else None
        return Fidelity(
            top1_agreement=first.agreement if first else None,
            rel_error=max(rel) if rel else 0.0,
            max_abs_error=max((o.max_abs_error for o in outputs), default=0.0),
            accuracy_before=self.correct_ref / self.labelled if self.labelled else None,
            accuracy_after=self.correct_cand / self.labelled if self.labelled else None,
            samples=self.samples,
            outputs=outputs,
            estimate=first.estimate if first else None,
            estimate_low=first.estimate_low if first else None,
            estimate_high=first.estimate_high if first else None,
            unseen=self.unseen,
            estimate_rule=self._rule() if first else "",
        )

    def _rule(self) -> str:
        if self.unseen:
            return "agreement as measured: the data are unseen"
        return (
            f"a sample counts as flipped where the candidate closes {MARGIN_SCALE:.0%} of the "
            "original's margin to another class: training data are easier than unseen data"
        )

    def _output(self, name: str, sums: _OutputSums) -> OutputFidelity:
        agreement = estimate = low = high = None
        flips = None
        if sums.kind in (CLASSES, SEQUENCE) and sums.positions and not sums.mismatched:
            agreement = sums.agree / sums.positions
            flips = sums.positions - (sums.agree if self.unseen else sums.kept)
            estimate = jeffreys_mean(sums.positions - flips, sums.positions)
            low, high = wilson_interval((1 - flips / sums.positions) * self.samples, self.samples)
        elif sums.kind in (CLASSES, SEQUENCE):
            agreement = estimate = low = high = 0.0 if sums.mismatched else None
        return OutputFidelity(
            name, sums.rel_error(), sums.max_abs, sums.close, kind=sums.kind or TENSOR,
            agreement=agreement, estimate=estimate, estimate_low=low, estimate_high=high, flips=flips,
            positions=sums.positions if flips is not None else None, **_region_fields(sums),
        )  # fmt: skip


def _region_fields(sums: _OutputSums) -> dict[str, float | None]:
    """A probability map's region figures for its :class:`OutputFidelity` (None for other kinds)."""
    regions = sums.regions
    if sums.kind != PROBABILITY or not regions.samples:
        return {}
    return {
        "iou": regions.mean(),
        "iou_se": regions.standard_error(),
        "iou_worst": regions.worst,
        "threshold": sums.threshold,
    }


def compare(
    reference: onnx.ModelProto | ModelHandle | StoredOutputs,
    candidate: onnx.ModelProto | ModelHandle,
    data: CalibrationData,
    batch_size: int,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    unseen: bool = True,
    threshold: float = DEFAULT_MAP_THRESHOLD,
) -> Fidelity:
    """Run both models in onnxruntime on ``data`` (streamed) and compare their outputs.

    A reference given as :class:`StoredOutputs` (taken on the same ``data`` and ``batch_size``) is not run.
    ``unseen``: ``data`` is not from the training set; its agreement is the estimate as is.
    ``threshold``: where probability maps are cut into regions.
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
    sums = FidelitySums(names, atol, rtol, unseen, threshold=threshold)
    for feed, labels in data.batches(batch_size):
        sums.add(expected(feed), cand.run(names, feed), labels)
    return sums.result()


#: A held-out batch as the reference keeps it: the feed, its labels, the original's outputs.
StoredBatch = tuple[Batch, np.ndarray | None, list[np.ndarray]]


def part_sums(
    handle: ModelHandle,
    part: Sequence[StoredBatch],
    names: list[str],
    atol: float,
    rtol: float,
    unseen: bool,
    threshold: float = DEFAULT_MAP_THRESHOLD,
) -> FidelitySums:
    """A candidate's sums over one part of the stored batches (a cluster task runs it on a worker)."""
    sums = FidelitySums(names, atol, rtol, unseen, threshold=threshold)
    for feed, labels, ref in part:
        sums.add(ref, handle.run(names, feed), labels)
    return sums


def merge_sums(parts: Sequence[FidelitySums]) -> FidelitySums:
    """The parts' sums added in their order (the first part's object is the result)."""
    total = parts[0]
    for other in parts[1:]:
        total.merge(other)
    return total


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
    ``unseen``: the held-out data are unseen by the model's training (``--eval-unseen``).
    """

    def __init__(
        self,
        model: onnx.ModelProto | ModelHandle,
        data: CalibrationData,
        batch_size: int,
        unseen: bool = False,
        threshold: float = DEFAULT_MAP_THRESHOLD,
    ) -> None:
        """``model`` as a ModelHandle keeps its session for later use (e.g. the latency measurement).

        ``threshold``: where probability maps are cut into regions.
        """
        handle = ModelHandle.of(model)
        self.names = [o.name for o in handle.session.get_outputs()]
        self.unseen = unseen
        self.threshold = threshold
        self.batch_size = batch_size
        self.batches: list[tuple[Batch, np.ndarray | None, list[np.ndarray]]] = [
            (feed, labels, handle.run(self.names, feed)) for feed, labels in data.batches(batch_size)
        ]
        self._parts: list[list[StoredBatch]] | None = None

    def parts(self) -> list[list[StoredBatch]]:
        """The batches in parts of about PART_SAMPLES samples (load/parts.py), the same object each call.

        A candidate's sums are taken per part and the parts' sums added in order, here as on a
        cluster, so that the two give the same bits (floating-point sums depend on their order).
        """
        if self._parts is None:
            counts = [len(next(iter(feed.values()))) for feed, _, _ in self.batches]
            self._parts, start = [], 0
            for size in batch_parts(counts, self.batch_size):
                self._parts.append(self.batches[start : start + size])
                start += size
        return self._parts

    def evaluate(
        self, candidate: onnx.ModelProto | ModelHandle, atol: float = 1e-5, rtol: float = 1e-5
    ) -> Fidelity:
        """Fidelity of ``candidate`` against the stored outputs."""
        handle = ModelHandle.of(candidate)
        parts = [
            part_sums(handle, part, self.names, atol, rtol, self.unseen, self.threshold)
            for part in self.parts()
        ]
        return self.merged(parts, atol, rtol)

    def merged(self, parts: Sequence[FidelitySums], atol: float, rtol: float) -> Fidelity:
        """The fidelity from the parts' sums, added in part order (here or from a cluster's tasks)."""
        if not parts:
            return FidelitySums(self.names, atol, rtol, self.unseen, threshold=self.threshold).result()
        return merge_sums(parts).result()

    def kinds(self) -> list[str]:
        """The kind of each output (:func:`output_kind`), from the first batch.

        A probability map is one on every batch (else a map), as the comparison counts it.
        """
        kinds = [output_kind(np.shape(o), o) for o in self.batches[0][2]]
        for i, kind in enumerate(kinds):
            if kind == PROBABILITY and not all(probabilities(outputs[i]) for _, _, outputs in self.batches):
                kinds[i] = MAP
        return kinds

    @property
    def samples(self) -> int:
        """How many samples the reference holds."""
        return sum(len(next(iter(feed.values()))) for feed, _, _ in self.batches)

    def head(self, samples: int, elements: int) -> Reference:
        """The same reference on its first samples, cut from its batches (nothing runs again).

        At most ``samples`` samples holding at most ``elements`` input values (at least one sample).
        """
        view = copy.copy(self)
        view.batches, view._parts, count, size = [], None, 0, 0
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
