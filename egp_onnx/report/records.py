"""Typed records of an analysis or compression run and their JSON-ready form."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class RectifierRecord:
    """Statistics of one activation node over the calibration set."""

    name: str | None  # owning layer, None when no Conv/Gemm/MatMul owns the activation
    op_type: str | None  # owning layer's op type
    rectifier: str  # activation node name
    activation: str  # activation op type (Relu, Clip, ...)
    prunable: bool  # True when this activation guides pruning (a ReLU with an owner)
    channels: int
    always_on: int
    always_off: int
    entropy: float
    on_fraction: float  # mean ON fraction over channels


@dataclass(frozen=True)
class AnalysisReport:
    """What `egp-onnx analyze` finds."""

    source: str  # the model analysed
    samples: int
    layers: tuple[RectifierRecord, ...]
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return _clean(asdict(self))


@dataclass(frozen=True)
class LayerRecord:
    """One prunable layer before and after compression."""

    name: str
    op_type: str
    rectifier: str
    channels: int
    entropy_before: float
    entropy: float  # after compression
    always_on: int  # after compression
    always_off: int
    weights: int
    nonzero_before: int
    nonzero: int
    sparsity: float
    state: str  # kept | pruned | identity | constant | merged | removed


@dataclass(frozen=True)
class LayerFit:
    """Reconstruction of one layer in one step: relative error on the calibration data before and after."""

    name: str
    rows: int  # rows of its normal equations (samples x positions used)
    columns: int  # unknowns per output channel, the bias included
    error_before: float | None  # ||A w - y||^2 / ||y||^2 with the pruned, not yet refit weights
    error_after: float | None  # the same after the refit
    status: str  # refit, or why not


@dataclass(frozen=True)
class StepRecord:
    """One pruning step of the loop."""

    step: int
    method: str  # egp | magnitude | magnitude-fallback
    removed: int
    sparsity: float  # of the prunable weights after the step
    accepted: bool  # False: the guard rejected the step and it was rolled back
    top1_agreement: float | None  # against the original, when fidelity is measured
    rel_error: float | None
    zero_entropy_layers: int | None  # after the step (None for a rejected step)
    emptied_layers: int  # layers with no non-zero weight after the step
    finetuned: bool = False  # the finetune callback retrained the step's model
    reconstructed: tuple[LayerFit, ...] = ()  # per-layer least-squares refits of this step
    estimate: float | None = None  # the guard's estimate of unseen top-1 agreement (Fidelity.estimate)
    problems: tuple[str, ...] = ()  # the guard's complaints, per output (empty: accepted)
    iou: float | None = None  # the lowest mean region IoU of the probability maps (Fidelity.region_iou)


@dataclass(frozen=True, kw_only=True)
class Rewrite:
    """One graph rewrite that surgery applied or declined."""

    # the name of a rewrite (or of its step) in surgery/registry.py: fold_bn | zero_off_channels |
    # remove_rectifier | fold_constant | merge | fold_residual
    kind: str
    nodes: tuple[str, ...]
    exact: bool  # exact by algebra, or on the calibration data for statistics-based rewrites
    applied: bool
    error: float | None = None  # measured relative output error, for inexact merges
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class SurgeryRecord:
    """What depth reduction did, and its check against the pruned model on the calibration data."""

    enabled: bool
    merge_tolerance: float
    rewrites: tuple[Rewrite, ...]
    dead_parameters_zeroed: int
    rel_error: float | None  # pruned model vs rewritten model, calibration data
    max_abs_error: float | None
    reverted: bool  # True when a check failed and the un-rewritten (pruned) model was kept
    revert_reason: str | None


@dataclass(frozen=True)
class OutputFidelity:
    """Differences on one graph output, over all samples."""

    name: str
    rel_error: float  # ||y' - y||_2 / ||y||_2
    max_abs_error: float
    # |y' - y| <= min(atol, 0.5 max|y|) + rtol |y| everywhere: Polygraphy's test, with an absolute
    # tolerance that cannot swallow the signal of an output of tiny magnitude
    allclose: bool
    # its rule: classes (N, C) | sequence (N, T, C) | probability (rank >= 3, values in [0, 1]) |
    # map (other rank >= 3) | tensor
    kind: str = "tensor"
    agreement: float | None = None  # classes, sequence: argmax agreement / greedy readings per sample
    estimate: float | None = None  # the same, estimated for unseen data (see Fidelity.estimate)
    estimate_low: float | None = None  # its 95% interval (Wilson, over samples)
    estimate_high: float | None = None
    flips: int | None = None  # samples the estimate counts as flipped ...
    positions: int | None = None  # ... of this many
    # probability: mean over samples of the IoU of the regions above `threshold` in the original's
    # and the candidate's map (1 where neither has any), its standard error, and the worst sample
    iou: float | None = None
    iou_se: float | None = None
    iou_worst: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class Fidelity:
    """How closely a candidate reproduces a reference."""

    top1_agreement: float | None  # first output of shape (N, classes); None otherwise
    rel_error: float  # the largest rel_error over the outputs
    max_abs_error: float
    accuracy_before: float | None  # when the data has labels
    accuracy_after: float | None
    samples: int
    outputs: tuple[OutputFidelity, ...]
    data: str = ""  # eval | holdout | calibration: where the samples came from
    # The estimate of top-1 agreement on unseen data (first classes output): on data that are not
    # marked unseen, samples where the candidate closes more than 90% of the original's margin to
    # another class count as flips (verify/fidelity.py); on unseen data, plain flips. The estimate
    # is (samples - flips + 1/2) / (samples + 1), the posterior mean under Jeffreys' prior.
    estimate: float | None = None
    estimate_low: float | None = None  # its 95% interval (Wilson, over samples)
    estimate_high: float | None = None
    unseen: bool = False  # the data are unseen by training (--eval-unseen): the estimate is the agreement
    estimate_rule: str = ""  # how the estimate was made from the data, in words

    @property
    def region_iou(self) -> float | None:
        """The lowest mean region IoU over the probability maps (None without one)."""
        return min((o.iou for o in self.outputs if o.iou is not None), default=None)


@dataclass(frozen=True)
class Cost:
    """What a model costs per sample."""

    params: int
    nonzero_params: int
    macs: int | None  # multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul, per sample
    nonzero_macs: int | None  # the same, counting only non-zero weights
    file_bytes: int
    # the serialised model deflated (zlib level 9): what a download or app bundle pays; None above
    # verify.cost.DEFLATE_MAX_BYTES (level 9 is slow on large pruned models)
    deflate_bytes: int | None


@dataclass(frozen=True)
class CostComparison:
    """The original's and the compressed model's costs."""

    before: Cost
    after: Cost
    #: The inputs' shapes (batch 1) the MACs are counted at: the most common shape of the held-out
    #: samples (a model with symbolic H/W costs what the image it is given costs).
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class StopRecord:
    """Why the pruning loop ended."""

    reason: str  # target | guard | no-weights-left | max-steps
    step: int  # the last accepted step (0: none)
    detail: str


@dataclass(frozen=True)
class LatencyRecord:
    """Latency of the original and the compressed model at one batch size, measured interleaved."""

    batch_size: int
    runs: int  # timed runs of each model (after the warm-up)
    median_ms_before: float
    iqr_ms_before: float  # interquartile range of the runs: the spread of the measurement
    median_ms_after: float
    iqr_ms_after: float
    speedup: float  # median_ms_before / median_ms_after


@dataclass(frozen=True)
class Timing:
    """onnxruntime CPU latency before and after (machine dependent, not byte-reproducible).

    Both models run in sessions with the same options (graph optimisation ``ORT_ENABLE_ALL``,
    default threads), so a speed-up is over what onnxruntime already does. Runs alternate between
    the two models after a warm-up, until ``max_runs`` runs or ``budget_s`` seconds per batch size.
    """

    optimization: str  # onnxruntime graph optimisation level of both sessions
    warmup: int  # untimed runs of each model per batch size
    budget_s: float
    max_runs: int
    batches: tuple[LatencyRecord, ...]  # batch 1 (when the model allows it) and the calibration batch
    #: The inputs' per-sample shapes (batch 1) timed: the most common shape of the held-out samples.
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class QuantizationRecord:
    """The last stage, ``--quantize``: what was asked, and whether the quantized model was kept."""

    mode: str  # int8
    scheme: str  # how it was quantized (format, weights, activations, calibration)
    calibration_samples: int  # samples the activation ranges come from
    zero_weights_checked: int  # pruned weights found to dequantize to exactly 0.0
    applied: bool  # False: the float model was kept (see reason)
    reason: str | None  # why not applied: quantization failed, or the quantized model failed the guard
    top1_agreement: float | None  # the quantized model against the original, on the held-out data
    rel_error: float | None
    accuracy: float | None  # the quantized model's, when the held-out data has labels


@dataclass(frozen=True)
class ModelSummary:
    """Whole-model figures."""

    params_before: int
    params_after: int
    nonzero_params_before: int
    nonzero_params_after: int
    prunable_layers: int
    prunable_weights: int
    prunable_zeroed: int
    sparsity: float  # prunable_zeroed / prunable_weights
    zero_entropy_layers_before: int
    zero_entropy_layers_after: int
    depth_before: int  # Conv/Gemm/MatMul on the longest input-to-output path
    depth_after: int
    nonlinear_depth_before: int  # activations on that path
    nonlinear_depth_after: int
    nodes_before: int
    nodes_after: int
    op_counts_before: dict[str, int]
    op_counts_after: dict[str, int]


@dataclass(frozen=True)
class CompressionReport:
    """What `egp-onnx compress` did, layer by layer and step by step."""

    source: str  # the input model
    settings: dict[str, Any]
    samples: int  # calibration samples
    layers: tuple[LayerRecord, ...]
    steps: tuple[StepRecord, ...]
    stop: StopRecord
    model: ModelSummary
    surgery: SurgeryRecord
    fidelity: Fidelity  # the compressed model against the original
    cost: CostComparison
    timing: Timing | None  # None with --no-latency
    channels: ChannelsRecord | None = None  # None without --channels
    quantization: QuantizationRecord | None = None  # None without --quantize
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return _clean(asdict(self))


def _clean(value: Any) -> Any:
    """Round floats for stable JSON and turn NaN into None."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 8)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass(frozen=True)
class ChannelGroupRecord:
    """One free channel group (graph/channels.py): its producer and what channel removal took."""

    producer: str
    rectifier: str
    consumers: tuple[str, ...]
    channels: int  # before
    kept: int
    always_off_removed: int  # exact removals (the channel was 0 on every calibration sample)


@dataclass(frozen=True)
class ChannelStepRecord:
    """One attempted channel-removal step."""

    step: int
    removed: int  # channels this step took (always-OFF ones included)
    always_off: int
    accepted: bool
    macs: int | None  # dense MACs per sample of the candidate
    top1_agreement: float | None
    rel_error: float | None
    detail: str  # why it was rejected or skipped; "" when accepted
    branch: str = ""  # the residual Add whose branch the step emptied whole ("" for a channel step)


@dataclass(frozen=True)
class ChannelsRecord:
    """What `--channels` did: the groups, the tied layers and why, the steps and why it stopped."""

    groups: tuple[ChannelGroupRecord, ...]
    tied: tuple[tuple[str, str], ...]  # (layer, why its channels cannot leave on their own)
    steps: tuple[ChannelStepRecord, ...]
    stop: str
    removed: int
    macs_before: int | None
    macs_after: int | None
    branches: tuple[str, ...] = ()  # residual Adds whose branch was emptied: the block is x + c


@dataclass(frozen=True, kw_only=True)
class LayerBlame:
    """One layer of a step the guard rejected: what the guard reads with that layer alone put back.

    Measured on the first held-out samples; the rejected model's own figures are its step's.
    """

    weight: str  # the layer's weight initializer
    removed: int  # weights the step removed from it
    rel_error: float  # the rejected model with this layer's weights as before the step
    top1_agreement: float | None
    samples: int


@dataclass(frozen=True, kw_only=True)
class GuardFailureReport:
    """What `compress --report` writes when no step passes the guard: why, and which layers hurt most."""

    source: str
    settings: dict[str, Any]
    error: str
    steps: tuple[StepRecord, ...]
    layers: tuple[LayerBlame, ...]  # the most damaging first
    result: str = "guard-failed"
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return _clean(asdict(self))
