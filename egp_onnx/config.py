"""The options of a compression run, checked once."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from egp_onnx.errors import ConfigError

METHODS = ("egp", "magnitude")
SELECTIONS = ("magnitude", "obs")
#: What ``quantize`` may ask for after pruning and surgery (None: stay float).
QUANTIZE_MODES = ("int8",)
#: The default target: compress as far as the guard allows, up to this sparsity.
SPARSITY_CEILING = 0.95
#: The default guard: top-1 agreement for classifier outputs (N, classes) ...
DEFAULT_MIN_AGREEMENT = 0.99
#: ... mean IoU of the thresholded regions for probability maps (rank >= 3, values in [0, 1]);
#: on RapidOCR's det, 0.97 still changed 2% of the lines read (README, "A real client") ...
DEFAULT_MIN_IOU = 0.98
#: ... cut at this value, DBNet's binarization threshold (a text detector's probability map) ...
DEFAULT_MAP_THRESHOLD = 0.3
#: ... and relative L2 output error for every other output (feature maps, regressions).
DEFAULT_MAX_REL_ERROR = 0.05


@dataclass(frozen=True)
class Settings:
    """Everything `compress` was asked to do; recorded in the report (``asdict``, in this order).

    Attributes:
        sparsity: fraction of the prunable weights to zero, in [0, 1); with the guard, a ceiling.
        step: fraction of the remaining weights removed per EGP step, in (0, 1].
        method: ``egp`` or ``magnitude``.
        batch_size: samples per onnxruntime call.
        seed: order among weights of equal magnitude, and the holdout split.
        surgery: reduce depth after pruning (fold, bypass, merge, delete layers).
        merge_tolerance: largest relative output error, measured on the calibration data, at
            which a merge that is not exact is applied; 0 applies exact rewrites only.
        holdout: fraction of the calibration data split off as held-out data (no eval_data);
            None: min(max(500, N/4), N/2) samples, or none when N < 4.
        eval_unseen: the eval data are unseen by the model's training (a test set): the guard's
            estimate of unseen agreement is their agreement as is.
        min_agreement: the guard's lowest estimate of unseen top-1 agreement with the original,
            for each classifier (N, classes) and sequence (N, T, classes) output.
        max_rel_error: the guard's largest relative output error against the original, for each
            other output (for every output when neither ``min_agreement`` nor ``min_iou`` is set).
        min_iou: the guard's lowest mean IoU, over samples, of the regions above ``map_threshold``
            in the original's and the candidate's output, for each probability map (rank >= 3,
            values in [0, 1] on the held-out data: a detector's or segmenter's Sigmoid output).
        map_threshold: where a probability map is cut into regions, in (0, 1).
        guard: False turns the guard off (then the loop runs to ``sparsity`` unchecked).
        reconstruct: refit pruned and downstream layers by ridge least squares after every step.
        select: which weights a layer loses: ``magnitude`` (smallest |w|) or ``obs`` (OBS
            saliency on the normal equations; needs ``reconstruct``).
        layer_cap: largest sparsity of a layer that every path to the outputs needs.
        sensitivity: before the loop, measure on the held-out data how far each layer may be
            pruned alone, and cap it there (with a guard; :mod:`egp_onnx.verify.sensitivity`).
            None: only when fewer than 1000 samples are held out (the report has what was done).
        latency: measure onnxruntime latency before and after.
        finetune: the finetune callback's name, when one is given (set by `compress`).
        channels: remove whole channels before pruning weights (api/channels.py): always-OFF
            ones exactly, others by entropy and refit cost under the guard.
        quantize: ``int8``: quantize the result statically (onnxruntime, QDQ, per-channel
            weights) as the last stage, judged by the guard; None: keep it float.

    """

    sparsity: float = SPARSITY_CEILING
    step: float = 0.5
    method: str = "egp"
    batch_size: int = 32
    seed: int = 0
    surgery: bool = True
    merge_tolerance: float = 0.0
    holdout: float | None = None  # None: split off a held-out set automatically when no eval data
    min_agreement: float | None = None
    max_rel_error: float | None = None
    min_iou: float | None = None
    map_threshold: float = DEFAULT_MAP_THRESHOLD
    eval_unseen: bool = False  # the eval data are unseen by training: their agreement is used as is
    guard: bool = True  # False: no fidelity guard at all (--no-guard)
    reconstruct: bool = True
    select: str = "magnitude"
    layer_cap: float = 0.98
    sensitivity: bool | None = None  # cap each layer where pruning it alone moves the held-out outputs
    latency: bool = True
    finetune: str | None = None  # the finetune callback's name, when one is given
    channels: bool = False  # --channels: remove whole channels first (api/channels.py)
    quantize: str | None = None  # "int8": static INT8 quantization as the last stage

    def check(self) -> None:
        """Raise ConfigError naming the first option outside its range."""
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 < self.step <= 1.0:
            raise ConfigError(f"--step must be in (0, 1], got {self.step}")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not _finite_at_least(self.merge_tolerance, 0.0):
            raise ConfigError(f"--merge-tolerance must be a finite number >= 0, got {self.merge_tolerance}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"--select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if not (math.isfinite(self.layer_cap) and 0.0 < self.layer_cap <= 1.0):
            raise ConfigError(f"--layer-cap must be in (0, 1], got {self.layer_cap}")
        if self.holdout is not None and not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")
        if self.max_rel_error is not None and not _finite_at_least(self.max_rel_error, 0.0):
            raise ConfigError(f"--max-rel-error must be a finite number >= 0, got {self.max_rel_error}")
        if self.min_iou is not None and not 0.0 <= self.min_iou <= 1.0:
            raise ConfigError(f"--min-iou must be in [0, 1], got {self.min_iou}")
        if not 0.0 < self.map_threshold < 1.0:
            raise ConfigError(f"--map-threshold must be in (0, 1), got {self.map_threshold}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be at least 0, got {self.seed}")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")

    @property
    def guarded(self) -> bool:
        """True when a fidelity guard is set."""
        thresholds = (self.min_agreement, self.max_rel_error, self.min_iou)
        return self.guard and any(t is not None for t in thresholds)


@dataclass(frozen=True)
class DataConfig:
    """How calibration data is read: image normalisation and loader threads (not in the report)."""

    mean: Sequence[float] = (0.0,)  # per channel, after scaling image pixels to [0, 1]
    std: Sequence[float] = (1.0,)
    workers: int = 0  # threads that load calibration shards ahead
    scheduler: str | None = None  # a Dask scheduler's address, or local:N (runtime/cluster.py)

    def check(self) -> None:
        """Raise ConfigError naming the first option outside its range."""
        if self.workers < 0:
            raise ConfigError(f"--workers must be at least 0, got {self.workers}")
        if any(v == 0 for v in self.std):
            raise ConfigError("--std values must be non-zero")
        if self.scheduler is not None and not self.scheduler.strip():
            raise ConfigError("--scheduler needs an address (tcp://host:8786) or local:N")


def split_options(options: dict[str, Any], *configs: type) -> list[dict[str, Any]]:
    """Keyword options split by the config dataclass each names a field of, in the order of ``configs``.

    Raises:
        ConfigError: naming an option that is a field of none of them.

    """
    names = [{f.name for f in fields(config)} for config in configs]
    unknown = sorted(set(options).difference(*names))
    if unknown:
        known = ", ".join(sorted(set().union(*names)))
        raise ConfigError(f"unknown option {unknown[0]!r}; the options are: {known}")
    return [{k: v for k, v in options.items() if k in group} for group in names]


def _finite_at_least(value: float, low: float) -> bool:
    """True when ``value`` is a finite number >= ``low`` (NaN and inf are not)."""
    return math.isfinite(value) and value >= low


def check_tolerances(atol: float, rtol: float, min_agreement: float | None = None) -> None:
    """Check `verify`'s tolerances: finite and >= 0; the agreement in [0, 1].

    Raises:
        ConfigError: naming the first option outside its range.

    """
    for option, value in (("--atol", atol), ("--rtol", rtol)):
        if not _finite_at_least(value, 0.0):
            raise ConfigError(f"{option} must be a finite number >= 0, got {value}")
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"--min-agreement must be in [0, 1], got {min_agreement}")


def check_positive(option: str, value: float) -> None:
    """Raise ConfigError unless ``value`` is a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{option} must be a finite number > 0, got {value}")
