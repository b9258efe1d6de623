"""The fidelity guard: its thresholds, its verdict, and the check that graph surgery changed nothing.

Policy: a pruning step is kept only when its model, run on the held-out data, still agrees with
the original on every output, each by the rule for its kind: the estimate of unseen argmax
agreement for classifier and sequence outputs, the IoU of the thresholded regions for probability
maps, relative output error for other maps and the rest; a
rewritten model is kept only when it reproduces the pruned model up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from egp_onnx.config import DEFAULT_MAX_REL_ERROR, DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_IOU, Settings
from egp_onnx.errors import EgpError
from egp_onnx.report.records import Fidelity, OutputFidelity
from egp_onnx.runtime.cluster import worker_cached
from egp_onnx.runtime.handle import ModelHandle
from egp_onnx.verify.fidelity import (
    CLASSES,
    PROBABILITY,
    SEQUENCE,
    FidelitySums,
    Reference,
    StoredBatch,
    part_sums,
    wilson_interval,
)

if TYPE_CHECKING:
    from egp_onnx.runtime.cluster import Cluster

#: Outputs judged by argmax agreement (the others by relative error).
AGREEMENT_KINDS = (CLASSES, SEQUENCE)
#: Outputs judged by the IoU of their thresholded regions (with ``min_iou``).
REGION_KINDS = (PROBABILITY,)
#: An agreement passes when the estimate, this many standard errors lower (the lower end of its
#: Wilson interval), is still at least ``min_agreement``. The loop tries several candidates
#: against the same held-out samples and keeps those that pass: a point estimate at the
#: threshold would keep the lucky ones. At 0.99, with 256 held-out samples no flip passes, with
#: 500 two (tests/verify/test_guard.py); a candidate with no flip passes whatever the count.
GUARD_Z = 1.0

#: A rewritten model with an output element y' such that |y' - y| > SURGERY_ATOL + SURGERY_RTOL |y|
#: (the atol capped at half the output's magnitude, see verify/fidelity.py) against the
#: pruned model's y on the calibration data, and a relative L2 error above SURGERY_CHECK on that
#: output, is a defect: the pruned model is kept instead. Either test alone misreads rounding: a
#: detection map's few large elements can differ by more than the element tolerance at a relative
#: L2 error of 2e-5, and a map of values ~1e-6 reads its rounding as a large relative error.
SURGERY_ATOL = 1e-4
SURGERY_RTOL = 1e-3
#: ... and with ``--merge-tolerance`` > 0 and an inexact merge applied, the check is the relative
#: L2 error of each output, at most the tolerance plus this.
SURGERY_CHECK = 1e-4


def default_thresholds(settings: Settings, reference: Reference) -> Settings:
    """The guard's thresholds: the user's, with the defaults for the outputs no given rule judges.

    Outputs judged by argmax agreement (classes, sequences) get :data:`DEFAULT_MIN_AGREEMENT`,
    probability maps :data:`DEFAULT_MIN_IOU`, every other output :data:`DEFAULT_MAX_REL_ERROR`;
    a user's ``max_rel_error`` judges every output that no other given rule covers by relative
    error (alone: every output).
    """
    if not settings.guard or settings.max_rel_error is not None:
        return settings
    kinds = reference.kinds()
    voting = any(kind in AGREEMENT_KINDS for kind in kinds)
    regions = any(kind in REGION_KINDS for kind in kinds)
    others = any(kind not in AGREEMENT_KINDS + REGION_KINDS for kind in kinds)
    min_agreement, min_iou = settings.min_agreement, settings.min_iou
    if min_agreement is None and voting:
        min_agreement = DEFAULT_MIN_AGREEMENT
    if min_iou is None and regions:
        min_iou = DEFAULT_MIN_IOU
    unjudged = min_agreement is None and min_iou is None
    max_rel_error = DEFAULT_MAX_REL_ERROR if others or unjudged else None
    return replace(settings, min_agreement=min_agreement, max_rel_error=max_rel_error, min_iou=min_iou)


def guard_problems(
    fidelity: Fidelity,
    min_agreement: float | None,
    max_rel_error: float | None,
    z: float = GUARD_Z,
    min_iou: float | None = None,
) -> list[str]:
    """The guard's complaints about ``fidelity``, output by output; empty when it passes.

    With ``min_agreement``, classifier and sequence outputs are judged by their estimate of unseen
    argmax agreement (:mod:`egp_onnx.verify.fidelity`) ``z`` standard errors lower (0: as
    measured); with ``min_iou``, probability maps by their mean region IoU ``z`` standard errors
    lower; with ``max_rel_error``, every other output
    (and all of them without the other two) by its relative L2 error, unless it matches element
    by element within a tolerance scaled to its own magnitude.
    """
    problems = []
    judged_by_agreement = judged_by_regions = False
    for out in fidelity.outputs:
        if min_iou is not None and out.kind in REGION_KINDS:
            judged_by_regions = True
            problem = _region_problem(out, min_iou, z)
            if problem:
                problems.append(problem)
        elif min_agreement is not None and out.kind in AGREEMENT_KINDS:
            judged_by_agreement = True
            value: float | None
            if out.flips is not None and out.positions:
                value = 1 - out.flips / out.positions  # the count itself: the prior is for the report
            else:
                value = out.estimate if out.estimate is not None else out.agreement
            if value is None:
                problems.append(f"output {out.name}: agreement is undefined")
                continue
            low = guard_bound(value, fidelity.samples, z)
            if low < min_agreement:
                words = _agreement_words(out, value, fidelity.unseen)
                lower = f", {low:.4f} at {z:g} standard error below," if z else ""
                problems.append(f"output {out.name}: {words}{lower} < {min_agreement}")
        elif max_rel_error is not None and not out.rel_error <= max_rel_error and not out.allclose:
            problems.append(f"output {out.name}: relative error {out.rel_error:.3g} > {max_rel_error}")
    if min_agreement is not None and not judged_by_agreement:
        problems.append("top-1 agreement is undefined: no output is (N, classes) or (N, T, classes)")
    if min_iou is not None and not judged_by_regions:
        problems.append("region IoU is undefined: no output is a probability map (values in [0, 1])")
    return problems


def region_bound(out: OutputFidelity, z: float = GUARD_Z) -> float | None:
    """What the guard compares with ``min_iou``: the mean region IoU ``z`` standard errors lower."""
    if out.iou is None:
        return None
    return out.iou - z * (out.iou_se or 0.0)


def _region_problem(out: OutputFidelity, min_iou: float, z: float) -> str:
    """The complaint about a probability map's regions ("" when they pass)."""
    low = region_bound(out, z)
    if low is None:
        return f"output {out.name}: region IoU is undefined"
    if low >= min_iou:
        return ""
    lower = f", {low:.4f} at {z:g} standard error below," if z else ""
    return (
        f"output {out.name}: mean IoU of the regions > {out.threshold:g} {out.iou:.4f} "
        f"(worst sample {out.iou_worst:.4f}){lower} < {min_iou}"
    )


def guard_bound(agreement: float, samples: int, z: float = GUARD_Z) -> float:
    """What the guard compares with ``min_agreement``: the agreement ``z`` standard errors lower.

    The lower end of its Wilson interval; an agreement of 1 (no flip seen) stays 1.
    """
    if agreement >= 1.0 or z == 0:
        return agreement
    return wilson_interval(agreement * samples, samples, z)[0]


def _agreement_words(out: OutputFidelity, value: float, unseen: bool) -> str:
    """How an agreement complaint reads: the judged value, and the plain agreement when they differ."""
    per = "top-1 agreement" if out.kind == CLASSES else "sequence agreement"
    if unseen or out.agreement is None or value == out.agreement:
        return f"{per} {value:.4f}"
    return f"{per} {value:.4f} counting near-flips (measured {out.agreement:.4f})"


def surgery_failures(check: Fidelity) -> list[OutputFidelity]:
    """Outputs on which an exact rewrite changed the pruned model.

    Changed: neither element-wise close nor within :data:`SURGERY_CHECK` relative L2 error (which
    is rounding, not a change of the model).
    """
    return [o for o in check.outputs if not o.allclose and not o.rel_error <= SURGERY_CHECK]


@dataclass(frozen=True)
class ShippedForm:
    """The form the written model takes in a last stage (``--quantize int8``: the INT8 model).

    A guard given one judges candidates in this form as well, when a stage asks: the stages before
    the last leave it its share of the guard, instead of spending all of it in float.
    """

    name: str  # how complaints name it ("INT8")
    make: Callable[[onnx.ModelProto], onnx.ModelProto]  # the candidate in that form (raises EgpError)


class Guard:
    """Fidelity of a candidate against the original, and the guard's complaints about it.

    With a :class:`ShippedForm` it also judges a candidate in that form (:meth:`shipped_problems`).

    It keeps the session of the last candidate it measured, so that when that candidate is the
    loop's result, graph surgery's check reuses it instead of building the same session again;
    the price is that this session stays in memory until the next candidate replaces it.
    """

    def __init__(
        self,
        reference: Reference,
        settings: Settings,
        held: Callable[[onnx.ModelProto], Mapping[str, np.ndarray]],
        shipped: ShippedForm | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        """Measure against ``reference`` with ``settings``' thresholds.

        ``held(model)``: the weights of ``model`` already in memory, so its session reads them
        instead of a copy. ``shipped``: judge candidates in that form too (see :class:`ShippedForm`).
        ``cluster``: loop candidates are measured there, part by part of the held-out batches
        (:func:`guard_part`), with the same sums as here.
        """
        self.reference, self.settings, self._held = reference, settings, held
        self.shipped = shipped
        self.cluster = cluster
        self._last: ModelHandle | None = None

    @property
    def measures_only(self) -> bool:
        """True when no threshold is set: every candidate is kept, whatever it measures."""
        return not self.settings.guarded

    def __call__(self, candidate: onnx.ModelProto) -> tuple[Fidelity, list[str]]:
        """The fidelity of a loop candidate and the guard's complaints about it.

        Its session reads the loop's copy of the pruned weights, not a new one; on a cluster, each
        worker builds its own from the candidate shipped once (the statistics pass that follows
        reuses it). This is the float verdict; the stages ask :meth:`shipped_problems` when they
        want the shipped form's too.
        """
        if self.cluster is None:
            return self.check(ModelHandle(candidate, known=self._held(candidate)))
        fidelity = self._on_cluster(self.cluster, candidate)
        return fidelity, self._problems(fidelity)

    def _on_cluster(self, cluster: Cluster, candidate: onnx.ModelProto) -> Fidelity:
        """The candidate's sums per part of the held-out batches on the workers, added in part order."""
        reference = self.reference
        if not reference.parts():
            return reference.merged([], SURGERY_ATOL, SURGERY_RTOL)
        # the held-out parts go to each worker once per run, the candidate once (with its statistics pass)
        model, parts = cluster.kept_model(candidate), cluster.kept_once("held", reference.parts())
        tolerances = (SURGERY_ATOL, SURGERY_RTOL)
        shared = (model.key, reference.names, *tolerances, reference.unseen, reference.threshold)
        items = [(p,) for p in range(len(reference.parts()))]
        sums = cluster.run_parts(guard_part, (model, parts), shared, items, what="guard measurement")
        return reference.merged(sums, SURGERY_ATOL, SURGERY_RTOL)

    def shipped_problems(self, candidate: onnx.ModelProto) -> list[str]:
        """The guard's complaints about ``candidate`` in its shipped form (none without one).

        Its cost is the form's (an INT8 quantization: a calibration run of its own), so the
        stages ask it of candidates that already pass in float.
        """
        if self.shipped is None or self.measures_only:
            return []
        name = self.shipped.name
        try:
            handle = ModelHandle(self.shipped.make(candidate))
            found = self.reference.evaluate(handle, SURGERY_ATOL, SURGERY_RTOL)
        except EgpError as exc:  # it cannot be made, or onnxruntime cannot run it
            return [f"as {name}: {exc}"]
        return [f"as {name}: {p}" for p in self._problems(found)]

    def check(self, handle: ModelHandle) -> tuple[Fidelity, list[str]]:
        """The fidelity of ``handle``'s model and the guard's complaints about it; its session is kept."""
        self._last = handle
        fidelity = self.reference.evaluate(handle, SURGERY_ATOL, SURGERY_RTOL)
        return fidelity, self._problems(fidelity)

    def _problems(self, fidelity: Fidelity) -> list[str]:
        settings = self.settings
        return guard_problems(
            fidelity, settings.min_agreement, settings.max_rel_error, min_iou=settings.min_iou
        )

    def handle(self, model: onnx.ModelProto) -> ModelHandle:
        """The last candidate's handle if ``model`` is that candidate (its session kept), else a new one.

        The guard forgets it: from here on the caller decides how long the session lives.
        """
        last, self._last = self._last, None
        return last if last is not None and last.model is model else ModelHandle(model)


def guard_part(
    model: bytes,
    parts: Sequence[Sequence[StoredBatch]],
    version: str,
    names: list[str],
    atol: float,
    rtol: float,
    unseen: bool,
    threshold: float,
    p: int,
) -> FidelitySums:
    """A candidate's sums over part ``p`` of the held-out batches, on a worker (Cluster.run_parts).

    Only the sums go back. The worker builds the candidate's session once per model version.
    """
    handle = worker_cached(f"{version}:guard", lambda: ModelHandle(onnx.load_from_string(model)))
    return part_sums(handle, parts[p], names, atol, rtol, unseen, threshold)
