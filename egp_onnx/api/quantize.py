"""The last stage, ``quantize="int8"``: static INT8 quantization of the compressed model, guarded.

Policy: the guard judges the quantized model against the original on the held-out data, with the
thresholds that judged every pruning step. When it fails, or onnxruntime cannot quantize the
model, the float model (pruned and rewritten) is kept: a warning says why, and so does the
report's ``quantization`` record. The guard's thresholds are what the user asked of the model
written; a faster model that breaks them is not it, and the float one still is. Without a guard
(``--no-guard``) the quantized model is kept and its fidelity reported.

The quantization runs after graph surgery (it quantizes the graph that ships: fewer layers, folded
BatchNormalizations) on the calibration data, not the held-out data the guard measures on.

The earlier stages leave it its share of the guard (:func:`shipped_form`): with ``quantize``, a
channel or weight candidate that passes in float is quantized the same way and judged again, so
their last accepted candidate is one whose INT8 form passes. Measured on the MNIST sample, one
quantization costs about 1.5 s (most of it onnxruntime's calibration run over 1500 samples),
paid only for the candidates the float verdict accepts (README "INT8 as the last stage").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

from egp_onnx.api.analyze import Progress
from egp_onnx.api.stages import Inputs
from egp_onnx.config import Settings
from egp_onnx.errors import EgpError
from egp_onnx.report.records import Fidelity, QuantizationRecord
from egp_onnx.runtime.handle import ModelHandle
from egp_onnx.runtime.quantize import INT8_SCHEME, Quantized, quantize_int8
from egp_onnx.verify.fidelity import Reference
from egp_onnx.verify.guard import Guard, ShippedForm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeOutcome:
    """The model to write after the stage, what runs it, its fidelity when measured, the record."""

    model: onnx.ModelProto
    run: ModelHandle
    fidelity: Fidelity | None  # the quantized model's, measured by the guard; None: the float model kept
    record: QuantizationRecord


def shipped_form(
    model: onnx.ModelProto, inputs: Inputs, reference: Reference, settings: Settings
) -> ShippedForm | None:
    """How the stages before this one judge their candidates: quantized as here, or None (float only).

    None without ``quantize`` or without the guard's thresholds, and when ``model`` (the one the
    stages start from) fails the guard once quantized: then no candidate would pass in that form,
    the stages are judged in float, and this stage keeps the float model and says why.
    """
    if settings.quantize is None or not settings.guarded:
        return None
    form = ShippedForm("INT8", lambda candidate: _quantized(candidate, inputs, settings).model)
    problems = Guard(reference, settings, dict, form).shipped_problems(model)
    if problems:
        log.warning(
            "the original model's INT8 form already fails the guard (%s): candidates are judged in float",
            "; ".join(problems),
        )
        return None
    return form


def _quantized(model: onnx.ModelProto, inputs: Inputs, settings: Settings) -> Quantized:
    """``model`` quantized as ``settings.quantize`` asks, its ranges from the calibration data."""
    return quantize_int8(model, (feed for feed, _ in inputs.data.batches(settings.batch_size)))


def quantize_stage(
    model: onnx.ModelProto,
    run: ModelHandle,
    inputs: Inputs,
    guard: Guard,
    settings: Settings,
    progress: Progress,
) -> QuantizeOutcome | None:
    """Quantize ``model`` (run by ``run``) as ``settings.quantize`` asks; None when it asks nothing."""
    if settings.quantize is None:
        return None
    progress.stage("quantizing to INT8")
    try:
        quantized = _quantized(model, inputs, settings)
    except EgpError as exc:
        reason = str(exc)
        log.warning("%s; keeping the float model", reason)
        return QuantizeOutcome(model, run, None, _record(settings, 0, 0, None, reason))
    handle = ModelHandle(quantized.model)
    try:
        fidelity, problems = guard.check(handle)
    except EgpError as exc:  # onnxruntime cannot run what it wrote
        fidelity, problems = None, [f"onnxruntime cannot run the INT8 model ({exc})"]
    if problems:
        reason = f"the INT8 model fails the guard on the {inputs.held_name} data: {'; '.join(problems)}"
        log.warning("%s; keeping the float model", reason)
        record = _record(settings, quantized.samples, quantized.zeros_checked, fidelity, reason)
        return QuantizeOutcome(model, run, None, record)
    run.release()  # the float model's session is not run again
    record = _record(settings, quantized.samples, quantized.zeros_checked, fidelity, None)
    return QuantizeOutcome(quantized.model, handle, fidelity, record)


def _record(
    settings: Settings, samples: int, zeros: int, fidelity: Fidelity | None, reason: str | None
) -> QuantizationRecord:
    return QuantizationRecord(
        mode=settings.quantize or "",
        scheme=INT8_SCHEME,
        calibration_samples=samples,
        zero_weights_checked=zeros,
        applied=reason is None,
        reason=reason,
        top1_agreement=fidelity.top1_agreement if fidelity else None,
        rel_error=fidelity.rel_error if fidelity else None,
        accuracy=fidelity.accuracy_after if fidelity else None,
    )
