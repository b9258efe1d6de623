"""Errors egp-onnx raises for bad input; the CLI turns each into one line and exit code 2."""

from __future__ import annotations

from typing import Any

#: The exit code of an unexpected failure, a defect of egp-onnx (bad input exits with 2).
INTERNAL_ERROR_EXIT = 3


class EgpError(Exception):
    """Base class: a problem with the user's input that the user can fix.

    The message is one line that names the problem and, where possible, the fix.
    """

    exit_code = 2
    label = "error"  # how the CLI introduces the message


class ModelError(EgpError):
    """The model file is missing, unreadable, not ONNX, or fails onnx.checker."""


class CalibrationError(EgpError):
    """Calibration data is missing, empty, non-finite or does not match the model's inputs."""


class ConfigError(EgpError):
    """An option is outside its range or options contradict each other."""


class OutputError(EgpError):
    """An output path cannot be written (exists without force, equals the input, unwritable)."""


class NothingToPruneError(EgpError):
    """The model has no Conv/Gemm/MatMul layer with an initializer weight that feeds a ReLU.

    Not a fault in the input, but there is no pruned model to write: exit code 2, nothing written.
    """

    label = "nothing to prune"


class FinetuneError(EgpError):
    """The finetune callback returned something that cannot be put back into the model."""


class MappingError(EgpError):
    """The ONNX model's parameters cannot be matched to a PyTorch module's unambiguously."""


class GuardError(EgpError):
    """Even the first pruning step breaks the fidelity guard: there is no model to write."""

    exit_code = 1

    def __init__(self, message: str, failure: Any = None) -> None:
        """``failure``: what the loop knows of it (:class:`egp_onnx.prune.loop.GuardFailure`)."""
        super().__init__(message)
        self.failure = failure
        #: the failure's report (:class:`egp_onnx.report.records.GuardFailureReport`), when
        #: compress measured which layers hurt most; the CLI writes it with --report
        self.report: Any = None


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception's message on one line (whitespace collapsed), shortened to ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
