"""Rectifiers whose channels never change state on the calibration data: exact on that data.

A layer's channels that its ReLU always turns OFF lose their weights and bias (``zero_off_channels``,
a step of this rewrite), and a rectifier that acts as the identity goes (``remove_rectifier``):
a ReLU whose channels are all always ON (or OFF, once zeroed), a LeakyRelu/PRelu whose channels
never change sign (the negative slope moves into the layer before it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from egp_onnx.graph.ops import ACTIVATIONS
from egp_onnx.surgery.registry import register_rewrite
from egp_onnx.surgery.surgeon import Surgeon
from egp_onnx.surgery.view import LayerView, clip_bounds, const, feeds_only, layer_view, per_channel

NAME = "remove_rectifier"
ZERO_OFF_CHANNELS = "zero_off_channels"


@register_rewrite(NAME, order=20, licence="statistics", steps=(ZERO_OFF_CHANNELS,))
def remove_rectifiers(s: Surgeon) -> bool:
    """Zero dead channels and bypass identity rectifiers, for every rectifier with statistics."""
    changed = False
    for node in list(s.graph.nodes):
        if _rectifier(s, node):
            changed = True
    if changed:
        s.commit()
    return changed


def _rectifier(s: Surgeon, node: gs.Node) -> bool:
    """Both steps for one node, when it is a removable rectifier whose channel states are known."""
    states = s.stats.get(node.name)
    kind = _removable_kind(node)
    if kind is None or states is None or not node.outputs:
        return False
    on, off = states.always_on, states.always_off
    source = node.inputs[0]
    producer = source.inputs[0] if source.inputs else None
    owner = layer_view(producer, s.graph) if producer is not None else None
    direct = owner is not None and feeds_only(source, node, s.graph)
    if owner is not None and owner.out_channels != on.size:
        return False
    if kind == "leaky":
        return _remove_leaky(s, node, owner if direct else None, on, off)
    changed = False
    if off.any() and direct:
        assert owner is not None
        changed = _zero_off_channels(s, owner, node, off)
    if not (on | off).all() or (off.any() and not direct):
        return changed
    if kind == "relu6" and not off.all():
        return changed  # ReLU6 is the identity only below 6: no upper count is measured
    _remove_rectifier(s, node, owner, f"{int(on.sum())} channels always ON, {int(off.sum())} always OFF")
    return True


def _zero_off_channels(s: Surgeon, owner: LayerView, node: gs.Node, off: np.ndarray) -> bool:
    """Zero the weights and bias of ``owner``'s channels that ``node`` always turns OFF, if any are live."""
    index: list[Any] = [slice(None)] * owner.weight.ndim
    index[owner.out_axis] = off
    live = int(np.count_nonzero(owner.weight[tuple(index)])) + int(np.count_nonzero(owner.bias()[off]))
    if not live:
        return False
    weight, bias = owner.weight.copy(), owner.bias().copy()
    weight[tuple(index)] = 0
    bias[off] = 0
    s.set_layer(owner, weight, bias)
    s.result.dead_parameters_zeroed += live
    detail = f"{int(off.sum())} always-OFF channels, {live} dead parameters zeroed"
    s.record(ZERO_OFF_CHANNELS, (owner.node.name, node.name), exact=True, applied=True, detail=detail)
    return True


def _remove_leaky(
    s: Surgeon, node: gs.Node, owner: LayerView | None, on: np.ndarray, off: np.ndarray
) -> bool:
    """LeakyRelu/PRelu whose channels never change sign: scale the OFF ones into the owner."""
    if not (on | off).all() or (off.any() and owner is None):
        return False
    if off.any():
        assert owner is not None
        slope = _slope(node, owner)
        if slope is None or not owner.float_exact:
            return False
        factor = np.where(off, slope, 1.0)
        shape = [1] * owner.weight.ndim
        shape[owner.out_axis] = -1
        s.set_layer(owner, owner.weight * factor.reshape(shape), owner.bias() * factor)
    _remove_rectifier(
        s,
        node,
        owner,
        f"{int(on.sum())} channels always positive, {int(off.sum())} always negative "
        "(slope moved into the layer)",
    )
    return True


def _remove_rectifier(s: Surgeon, node: gs.Node, owner: LayerView | None, detail: str) -> None:
    """Bypass a rectifier that acts as the identity; its owner's state says so."""
    s.bypass(node)
    if owner is not None:
        s.state(owner.node.name, "identity")
    s.record(NAME, (node.name,), exact=True, applied=True, detail=detail)


def _removable_kind(node: gs.Node) -> str | None:
    """relu, relu6 (a Clip with min 0) or leaky (LeakyRelu/PRelu) for activations surgery may remove."""
    activation = ACTIVATIONS.get(node.op)
    if activation is None or not activation.removable:
        return None
    if activation.kind in ("leaky_relu", "prelu"):
        return "leaky"  # one sign per channel: the negative side's slope moves into the layer
    if activation.from_zero:  # a Clip: removable as a ReLU (no upper bound) or a ReLU6 (min 0)
        bounds = clip_bounds(node)
        if bounds is None or bounds[0] != 0.0:
            return None
        return "relu" if np.isinf(bounds[1]) else "relu6"
    return activation.kind


def _slope(node: gs.Node, owner: LayerView) -> np.ndarray | None:
    """The negative-side slope of a LeakyRelu/PRelu per owner channel, None when not per-channel."""
    channels = owner.out_channels
    if node.op == "LeakyRelu":
        return np.full(channels, float(node.attrs.get("alpha", 0.01)))
    value = const(node.inputs[1]) if len(node.inputs) > 1 else None
    # PRelu broadcasts the slope from the right, as a per-channel operand of the layer's output
    return None if value is None else per_channel(value, channels, owner.weight.ndim if owner.conv else 2)
