"""The fidelity guard: its thresholds, its verdict, and the check that graph surgery changed nothing.

Policy: a pruning step is kept only when its model, run on the held-out data, still agrees with
the original (top-1 agreement for classifier outputs, relative output error otherwise); a
rewritten model is kept only when it reproduces the pruned model element by element.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np
import onnx

from egp_onnx.config import DEFAULT_MAX_REL_ERROR, DEFAULT_MIN_AGREEMENT, Settings
from egp_onnx.report.records import Fidelity
from egp_onnx.runtime.handle import ModelHandle
from egp_onnx.verify.fidelity import Reference

#: A rewritten model with an output element y' such that |y' - y| > SURGERY_ATOL + SURGERY_RTOL |y|
#: against the pruned model's y on the calibration data is a defect: the pruned model is kept
#: instead. Per element, as ``verify`` checks, so that outputs of tiny magnitude (a detection
#: map's sigmoid at 1e-6) do not read onnxruntime's own rounding as a large relative error.
SURGERY_ATOL = 1e-4
SURGERY_RTOL = 1e-3
#: With ``--merge-tolerance`` > 0 and an inexact merge applied, the check is instead the relative
#: L2 error of each output, at most the tolerance plus this.
SURGERY_CHECK = 1e-4


def default_thresholds(settings: Settings, reference: Reference) -> Settings:
    """The guard's thresholds: the user's, else agreement for classifiers and relative error otherwise."""
    if not settings.guard or settings.min_agreement is not None or settings.max_rel_error is not None:
        return settings
    if reference.classifier():
        return replace(settings, min_agreement=DEFAULT_MIN_AGREEMENT)
    return replace(settings, max_rel_error=DEFAULT_MAX_REL_ERROR)


def guard_problems(fidelity: Fidelity, min_agreement: float | None, max_rel_error: float | None) -> list[str]:
    """The guard's complaints about ``fidelity``; empty when it passes.

    Outputs that match element-wise within the comparison's atol + rtol |y| pass the relative-error
    rule whatever their relative L2 error: on outputs of ~1e-6 (a sigmoid detection map),
    onnxruntime's own rounding reads as tens of percent relative.
    """
    problems = []
    if min_agreement is not None:
        agreement = fidelity.top1_agreement
        if agreement is None:
            problems.append("top-1 agreement is undefined: the first output is not (N, classes)")
        elif agreement < min_agreement:
            problems.append(f"top-1 agreement {agreement:.4f} < {min_agreement}")
    elementwise = bool(fidelity.outputs) and all(o.allclose for o in fidelity.outputs)
    if max_rel_error is not None and not fidelity.rel_error <= max_rel_error and not elementwise:
        problems.append(f"relative error {fidelity.rel_error:.3g} > {max_rel_error}")
    return problems


class Guard:
    """Fidelity of a candidate against the original, and the guard's complaints about it.

    It keeps the session of the last candidate it measured, so that when that candidate is the
    loop's result, graph surgery's check reuses it instead of building the same session again;
    the price is that this session stays in memory until the next candidate replaces it.
    """

    def __init__(
        self,
        reference: Reference,
        settings: Settings,
        held: Callable[[onnx.ModelProto], Mapping[str, np.ndarray]],
    ) -> None:
        """Measure against ``reference`` with ``settings``' thresholds.

        ``held(model)``: the weights of ``model`` already in memory, so its session reads them
        instead of a copy.
        """
        self.reference, self.settings, self._held = reference, settings, held
        self._last: ModelHandle | None = None

    @property
    def measures_only(self) -> bool:
        """True when no threshold is set: every candidate is kept, whatever it measures."""
        return not self.settings.guarded

    def __call__(self, candidate: onnx.ModelProto) -> tuple[Fidelity, list[str]]:
        """The fidelity of a loop candidate and the guard's complaints about it.

        Its session reads the loop's copy of the pruned weights, not a new one.
        """
        return self.check(ModelHandle(candidate, known=self._held(candidate)))

    def check(self, handle: ModelHandle) -> tuple[Fidelity, list[str]]:
        """The fidelity of ``handle``'s model and the guard's complaints about it; its session is kept."""
        self._last = handle
        fidelity = self.reference.evaluate(handle, SURGERY_ATOL, SURGERY_RTOL)
        return fidelity, guard_problems(fidelity, self.settings.min_agreement, self.settings.max_rel_error)

    def handle(self, model: onnx.ModelProto) -> ModelHandle:
        """The last candidate's handle if ``model`` is that candidate (its session kept), else a new one.

        The guard forgets it: from here on the caller decides how long the session lives.
        """
        last, self._last = self._last, None
        return last if last is not None and last.model is model else ModelHandle(model)
