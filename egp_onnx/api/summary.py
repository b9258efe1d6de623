"""Assembling the compression report from the run's pieces."""

from __future__ import annotations

import numpy as np
import onnx

from egp_onnx import entropy as ent
from egp_onnx.entropy import Statistics
from egp_onnx.graph.rectifiers import RectifierSite
from egp_onnx.graph.structure import depth, op_counts
from egp_onnx.prune.loop import LayerSet
from egp_onnx.report.records import Cost, LayerRecord, ModelSummary, RectifierRecord


def site_record(site: RectifierSite, stats: Statistics) -> RectifierRecord:
    """The statistics of one rectifier, with the layer that owns it."""
    counts = stats.counts[site.name]
    on, off = ent.constant_channels(counts.on, counts.total)
    owner = site.owner
    return RectifierRecord(
        name=owner.name if owner else None,
        op_type=owner.op_type if owner else None,
        rectifier=site.name,
        activation=site.op_type,
        prunable=site.prunable,
        channels=int(counts.on.size),
        always_on=int(on.sum()),
        always_off=int(off.sum()),
        entropy=ent.layer_entropy(counts.on, counts.total),
        on_fraction=float(ent.on_fraction(counts.on, counts.total).mean()) if counts.on.size else 0.0,
    )


def layer_state(weights: int, nonzero: int, entropy: float, channels: int, always_off: int) -> str:
    """The state a layer is in when surgery did not rewrite it."""
    if nonzero == 0 or always_off == channels:
        return "constant"
    if entropy == 0.0:
        return "identity"
    return "pruned" if nonzero < weights else "kept"


def layer_records(
    layers: LayerSet, before: Statistics, after: Statistics, nnz_before: np.ndarray, states: dict[str, str]
) -> tuple[LayerRecord, ...]:
    """One record per prunable layer: entropy before/after, weights, state."""
    h_before, h_after = layers.entropies(before), layers.entropies(after)
    nnz, sizes = layers.nnz(), layers.sizes()
    records = []
    for i, site in enumerate(layers.sites):
        assert site.owner is not None  # LayerSet keeps owned sites only
        counts = after.counts[site.name]
        on, off = ent.constant_channels(counts.on, counts.total)
        state = states.get(site.owner.name) or layer_state(
            int(sizes[i]), int(nnz[i]), float(h_after[i]), int(counts.on.size), int(off.sum())
        )
        records.append(
            LayerRecord(
                name=site.owner.name,
                op_type=site.owner.op_type,
                rectifier=site.name,
                channels=int(counts.on.size),
                entropy_before=float(h_before[i]),
                entropy=float(h_after[i]),
                always_on=int(on.sum()),
                always_off=int(off.sum()),
                weights=int(sizes[i]),
                nonzero_before=int(nnz_before[i]),
                nonzero=int(nnz[i]),
                sparsity=1.0 - float(nnz[i]) / float(sizes[i]),
                state=state,
            )
        )
    return tuple(records)


def model_summary(
    layers: LayerSet,
    before: Statistics,
    after: Statistics,
    original: onnx.ModelProto,
    final: onnx.ModelProto,
    cost_before: Cost,
    cost_after: Cost,
) -> ModelSummary:
    """Whole-model figures: parameters, sparsity, zero-entropy layers, depth, op counts."""
    h_before, h_after = layers.entropies(before), layers.entropies(after)
    total = int(layers.sizes().sum())
    zeroed = total - int(layers.nnz().sum())
    depth_before, depth_after = depth(original), depth(final)
    return ModelSummary(
        params_before=cost_before.params,
        nonzero_params_before=cost_before.nonzero_params,
        params_after=cost_after.params,
        nonzero_params_after=cost_after.nonzero_params,
        prunable_layers=len(layers.sites),
        prunable_weights=total,
        prunable_zeroed=zeroed,
        sparsity=zeroed / total,
        zero_entropy_layers_before=int((h_before == 0).sum()),
        zero_entropy_layers_after=int((h_after == 0).sum()),
        depth_before=depth_before.layers,
        depth_after=depth_after.layers,
        nonlinear_depth_before=depth_before.nonlinear,
        nonlinear_depth_after=depth_after.nonlinear,
        nodes_before=len(original.graph.node),
        nodes_after=len(final.graph.node),
        op_counts_before=op_counts(original),
        op_counts_after=op_counts(final),
    )
