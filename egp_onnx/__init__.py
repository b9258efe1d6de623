"""egp-onnx: Entropy-Guided Pruning for ONNX models.

Public API: :func:`analyze` and :func:`compress`, their reports, and the error types.
"""

from egp_onnx.api.analyze import analyze, statistics
from egp_onnx.api.compress import CompressionResult, compress
from egp_onnx.errors import (
    CalibrationError,
    ConfigError,
    EgpError,
    ModelError,
    NothingToPruneError,
    OutputError,
)
from egp_onnx.report.records import AnalysisReport, CompressionReport, LayerRecord, RectifierRecord

__version__ = "0.1.0"

__all__ = [
    "AnalysisReport",
    "CalibrationError",
    "CompressionReport",
    "CompressionResult",
    "ConfigError",
    "EgpError",
    "LayerRecord",
    "ModelError",
    "NothingToPruneError",
    "OutputError",
    "RectifierRecord",
    "analyze",
    "compress",
    "statistics",
]
