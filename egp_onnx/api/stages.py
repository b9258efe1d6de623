"""The plain stages ``compress`` composes: its options, its inputs, and model plumbing between stages."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from egp_onnx import entropy as ent
from egp_onnx.api.analyze import DataSource, ModelSource, load_source, open_data
from egp_onnx.config import DataConfig, Settings, split_options
from egp_onnx.entropy import Statistics
from egp_onnx.errors import ConfigError, NothingToPruneError
from egp_onnx.graph.ops import REMOVABLE_KINDS
from egp_onnx.graph.rectifiers import RectifierSite, find_rectifiers
from egp_onnx.graph.weights import split_weights
from egp_onnx.load.calibration import CalibrationData, split_holdout
from egp_onnx.prune.finetune import Finetune, callback_name
from egp_onnx.prune.limits import sparsity_limits
from egp_onnx.prune.loop import LayerSet
from egp_onnx.runtime.handle import ModelHandle
from egp_onnx.surgery import ChannelStates

log = logging.getLogger(__name__)


def run_options(
    settings: Settings | None,
    data: DataConfig | None,
    finetune: Finetune | None,
    eval_data: DataSource | None,
    overrides: dict[str, Any],
) -> tuple[Settings, DataConfig]:
    """The run's settings and data options, checked.

    Raises:
        ConfigError: an unknown option, one outside its range, or two that exclude each other.

    """
    setting_overrides, data_overrides = split_options(overrides, Settings, DataConfig)
    settings = replace(settings or Settings(), **setting_overrides)
    settings = replace(settings, finetune=None if finetune is None else callback_name(finetune))
    settings.check()
    if eval_data is not None and settings.holdout is not None:  # --holdout 0 too: documented as exclusive
        raise ConfigError("give either --eval or --holdout, not both")
    if settings.eval_unseen and eval_data is None:
        raise ConfigError("--eval-unseen describes the --eval data; give --eval with it")
    if settings.select == "obs" and not settings.reconstruct:
        raise ConfigError("--select obs needs reconstruction; drop --no-reconstruct")
    return settings, replace(data or DataConfig(), **data_overrides)


@dataclass(frozen=True)
class Inputs:
    """The run's inputs, opened and checked: the data, the held-out data, the prunable layers."""

    source: str
    data: CalibrationData
    held: CalibrationData  # what fidelity is measured on
    held_name: str  # "eval", "holdout" or "calibration"
    sites: list[RectifierSite]
    layers: LayerSet
    limits: Mapping[str, float]


def open_inputs(
    model: ModelSource,
    calib: DataSource,
    eval_data: DataSource | None,
    settings: Settings,
    options: DataConfig,
) -> tuple[onnx.ModelProto, Inputs]:
    """Load the model and its data, split off the held-out data, find the prunable layers.

    Raises:
        NothingToPruneError: no layer can be pruned.

    """
    proto, source = load_source(model)
    data = open_data(calib, proto, options)
    if eval_data is not None:
        held, held_name = open_data(eval_data, proto, options), "eval"
    elif settings.holdout is None or settings.holdout > 0:
        fixed = data.specs[0].shape[0] if data.specs[0].shape else None
        whole = data
        data, held = split_holdout(data, settings.holdout, settings.seed, batch=fixed)
        held_name = "holdout" if held is not data else "calibration"
        _say_split(whole.description, data, held, fixed)
    else:
        held, held_name = data, "calibration"
    sites = find_rectifiers(proto)
    layers = LayerSet(proto, sites)
    if not layers.sites:
        raise NothingToPruneError(
            f"{source}: no Conv/Gemm/MatMul layer with an initializer weight feeds a ReLU; no output written"
        )
    limits = sparsity_limits(proto, layers.weight_names, settings.layer_cap)
    if settings.sparsity > 0 and not any(limits.values()):
        raise NothingToPruneError(
            f"{source}: every prunable layer feeds a graph output directly, and output layers stay dense; "
            "no output written"
        )
    return proto, Inputs(source, data, held, held_name, sites, layers, limits)


def _say_split(source: str, data: CalibrationData, held: CalibrationData, fixed: int | None) -> None:
    """Say how the automatic split came out when the data or a fixed batch size shaped it."""
    if held is data:
        reason = (
            f"the model's batch size is fixed at {fixed} and they fill fewer than two batches"
            if fixed
            else ("fewer than 4")
        )
        log.warning(
            "%s: %s samples, %s: fidelity is measured on the calibration data itself (no holdout)",
            source,
            _count(data),
            reason,
        )
    elif fixed is not None:
        log.info(
            "%s: %d samples held out and %d for calibration, in batches of %d (the model's fixed batch size)",
            source,
            _count(held),
            _count(data),
            fixed,
        )


def _count(data: CalibrationData) -> int:
    arrays, _ = data.arrays()
    return int(next(iter(arrays.values())).shape[0])


def channel_states(sites: list[RectifierSite], stats: Statistics) -> dict[str, ChannelStates]:
    """Per activation node that surgery may remove, which channels are always ON / OFF.

    The slices of an activation after a Concat are put back together in channel order.
    """
    parts: dict[str, list[tuple[int, tuple[np.ndarray, np.ndarray]]]] = {}
    for site in sites:
        counts = stats.counts[site.name]
        if site.kind in REMOVABLE_KINDS and counts.on.size:
            start = site.channels[0] if site.channels else 0
            parts.setdefault(site.node, []).append((start, ent.constant_channels(counts.on, counts.total)))
    states = {}
    for node, slices in parts.items():
        slices.sort(key=lambda part: part[0])
        on = np.concatenate([part[1][0] for part in slices])
        off = np.concatenate([part[1][1] for part in slices])
        states[node] = ChannelStates(on, off)
    return states


def weightless(model: onnx.ModelProto, known: Mapping[str, np.ndarray]) -> ModelHandle:
    """``model`` with its session, holding the model without its weights: only the session keeps them.

    ``known``: values of the model's initializers already read (see ``split_weights``).
    """
    stubbed, weights = split_weights(model, known=known)
    return ModelHandle(stubbed, (stubbed, weights))


def strip_value_info(model: onnx.ModelProto, in_place: bool) -> onnx.ModelProto:
    """Drop the value_info our shape inference added, so the output stays as lean as the input.

    ``in_place`` for a model the run made itself (the loop's): no copy of its weights.
    """
    copy = model
    if not in_place:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
    del copy.graph.value_info[:]
    return copy
