"""Knowledge distillation for finetuning: the original model's outputs as the teacher's.

The guard judges a compressed model by its top-1 agreement with the original, not by its accuracy
on labels. Cross-entropy on labels pulls a finetuned model toward the labels, away from the
original's answers where the two differ (issue 22: one epoch with nothing pruned lost 1.4 to 3.4
points of agreement on the wide Fashion sample). Distilling on the original's outputs trains toward
what the guard measures. The teacher is the ONNX model compress starts from, run once by
onnxruntime on the training inputs; its first output must be the class logits (pre-softmax), one
row per sample.
"""

from __future__ import annotations

import numpy as np
import onnx

from egp_onnx.errors import FinetuneError
from egp_onnx.load.calibration import input_specs
from egp_onnx.runtime.handle import ModelHandle

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "egp_onnx.integrations.distill needs PyTorch: pip install 'egp-onnx[torch]' "
        "(torch==2.13.0, a CPU build)"
    ) from exc

#: Samples per onnxruntime run of the teacher: small models, a few MB of activations per batch
TEACHER_BATCH = 256


def teacher_logits(model: onnx.ModelProto, inputs: np.ndarray, batch_size: int = TEACHER_BATCH) -> np.ndarray:
    """The model's first output on ``inputs`` (its only input), batch by batch, as float32 (N, classes).

    Raises:
        FinetuneError: the model has more than one input, or its first output is not one row of
            logits per sample.

    """
    specs = input_specs(model)
    if len(specs) != 1:
        raise FinetuneError(
            f"distillation runs the original on the training inputs, but it has {len(specs)} inputs, not 1"
        )
    name, output = specs[0].name, model.graph.output[0].name
    handle = ModelHandle(model)
    try:
        parts = [
            handle.run([output], {name: np.ascontiguousarray(inputs[i : i + batch_size], specs[0].dtype)})[0]
            for i in range(0, len(inputs), batch_size)
        ]
    finally:
        handle.release()  # the session's copy of the weights is not needed after this
    logits = np.concatenate(parts).astype(np.float32)
    if logits.ndim != 2 or logits.shape[0] != len(inputs):
        raise FinetuneError(
            f"distillation needs the original's first output ({output}) to be logits shaped "
            f"(samples, classes); it is {logits.shape} for {len(inputs)} samples"
        )
    return logits


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.

    T^2 keeps the gradient's scale as T changes (Hinton et al., 2015), so the weight against the
    cross-entropy means the same at any temperature. Zero where the student's logits equal the
    teacher's (up to a constant per row): training from the original itself moves nothing.
    """
    log_p = nn.functional.log_softmax(teacher / temperature, dim=1)
    log_q = nn.functional.log_softmax(student / temperature, dim=1)
    kl = nn.functional.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl * temperature**2


def finetune_loss(
    student: torch.Tensor,
    labels: torch.Tensor | None,
    teacher: torch.Tensor | None,
    distill: float,
    temperature: float,
) -> torch.Tensor:
    """(1 - distill) * cross-entropy on ``labels`` + distill * :func:`distillation_loss` on ``teacher``.

    A term whose weight is 0 is not computed (its data may be None).
    """
    loss = student.new_zeros(())
    if distill < 1.0:
        assert labels is not None  # ClassificationFinetune refuses a train file without labels then
        loss = loss + (1.0 - distill) * nn.functional.cross_entropy(student, labels)
    if distill > 0.0:
        assert teacher is not None  # computed in ClassificationFinetune.start
        if teacher.shape != student.shape:
            raise FinetuneError(
                f"the original's first output has {tuple(teacher.shape[1:])} per sample, the torch "
                f"module's {tuple(student.shape[1:])}: distillation needs both to be the class logits"
            )
        loss = loss + distill * distillation_loss(student, teacher, temperature)
    return loss
