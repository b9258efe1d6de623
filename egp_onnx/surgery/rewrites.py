"""Depth reduction with onnx-graphsurgeon: fold, bypass, merge and delete layers.

Every rewrite is licensed either by algebra (exact: BatchNormalization folding, dense merges,
convolution merges without border effects, residual folds) or by the calibration statistics
(exact on the data measured: removing a ReLU whose channels never change state, zeroing the
weights of channels that are always OFF). Merges that are not exact are applied only when a
caller-supplied measurement keeps the output error within the tolerance.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from egp_onnx.graph.topology import LAYER_OPS, serialized_size
from egp_onnx.report.records import Rewrite
from egp_onnx.surgery import algebra as kernels
from egp_onnx.surgery.export import export_model
from egp_onnx.surgery.view import (
    LayerView,
    batchnorm_params,
    clip_bounds,
    const,
    feeds_only,
    layer_view,
    single_consumer,
    through_elementwise,
)

#: Rewritten models of at least this many bytes make simplify run a full garbage collection.
COLLECT_BYTES = 64 * 2**20

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelStates:
    """Per-channel constancy of one rectifier on the calibration data."""

    always_on: np.ndarray  # bool (C,)
    always_off: np.ndarray  # bool (C,)


@dataclass
class SurgeryResult:
    """The rewritten model, what was done, and the state of every layer that changed."""

    model: onnx.ModelProto
    rewrites: list[Rewrite] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)  # layer name -> identity|constant|merged|removed
    dead_parameters_zeroed: int = 0


Measure = Callable[[onnx.ModelProto], float]


class _Surgeon:
    def __init__(
        self,
        model: onnx.ModelProto,
        stats: Mapping[str, ChannelStates],
        measure: Measure | None,
        tolerance: float,
    ) -> None:
        self.graph = gs.import_onnx(model)
        self.stats = stats
        self.measure = measure
        self.tolerance = tolerance
        self.result = SurgeryResult(model)
        self._names = {n.name for n in self.graph.nodes}

    # ---------------------------------------------------------------- helpers
    def _name(self, base: str) -> str:
        name = base
        while name in self._names:
            name += "_"
        self._names.add(name)
        return name

    def _constant(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self._name(base), np.ascontiguousarray(values))

    def _set_layer(self, layer: LayerView, weight: np.ndarray, bias: np.ndarray | None) -> None:
        node = layer.node
        # copy=False: the arrays are never written in place once they are a constant's values
        node.inputs[1] = self._constant(f"{node.name}.weight", weight.astype(layer.weight.dtype, copy=False))
        if bias is not None:
            b = self._constant(f"{node.name}.bias", bias.astype(layer.weight.dtype, copy=False))
            if len(node.inputs) > 2:
                node.inputs[2] = b
            elif node.op == "MatMul":
                return self._matmul_bias(node, b)
            else:
                node.inputs.append(b)

    def _matmul_bias(self, node: gs.Node, bias: gs.Constant) -> None:
        out = node.outputs[0]
        mid = gs.Variable(self._name(f"{node.name}.nobias"), dtype=out.dtype)
        node.outputs = [mid]
        self.graph.nodes.append(
            gs.Node("Add", self._name(f"{node.name}.bias"), inputs=[mid, bias], outputs=[out])
        )

    def _bypass(self, node: gs.Node) -> None:
        """Remove a one-input node: its consumers read its input instead."""
        source, out = node.inputs[0], node.outputs[0]
        if out in self.graph.outputs:
            node.op, node.attrs = "Identity", {}  # keep the graph output's name
            while len(node.inputs) > 1:  # gs's synchronized lists cannot delete slices
                node.inputs.pop()
            return
        for consumer in list(out.outputs):
            consumer.inputs = [source if t is out else t for t in consumer.inputs]
        node.outputs = []

    def _record(self, rewrite: Rewrite) -> None:
        self.result.rewrites.append(rewrite)
        log.info("%s %s: %s", rewrite.kind, ",".join(rewrite.nodes), rewrite.detail)

    def _state(self, name: str, state: str) -> None:
        """Record the latest state of every original layer behind ``name`` (merged names join by +)."""
        for part in name.split("+"):
            self.result.states[part] = state

    def _commit(self) -> None:
        self.graph.cleanup().toposort()

    # -------------------------------------------------------------- rewrites
    def fold_batchnorms(self) -> bool:
        changed = False
        for node in list(self.graph.nodes):
            params = batchnorm_params(node)
            producer = node.inputs[0].inputs[0] if node.inputs and node.inputs[0].inputs else None
            if params is None or producer is None:
                continue
            layer = layer_view(producer, self.graph)
            if (
                layer is None
                or not layer.float_exact
                or layer.node.op == "MatMul"
                or not feeds_only(node.inputs[0], node, self.graph)
            ):
                continue
            weight, bias = kernels.fold_batchnorm(
                layer.weight, layer.bias(), *params, out_axis=layer.out_axis
            )
            self._set_layer(layer, weight, bias)
            layer.node.outputs = list(node.outputs)
            node.outputs = []
            self._record(Rewrite("fold_bn", (layer.node.name, node.name), True, True))
            changed = True
        return changed

    def rectifiers(self) -> bool:
        changed = False
        for node in list(self.graph.nodes):
            states = self.stats.get(node.name)
            kind = _removable_kind(node)
            if kind is None or states is None or not node.outputs:
                continue
            on, off = states.always_on, states.always_off
            source = node.inputs[0]
            producer = source.inputs[0] if source.inputs else None
            owner = layer_view(producer, self.graph) if producer is not None else None
            direct = owner is not None and feeds_only(source, node, self.graph)
            if owner is not None and owner.out_channels != on.size:
                continue
            if kind == "leaky":
                if self._remove_leaky(node, owner if direct else None, on, off):
                    changed = True
                continue
            if off.any() and direct:
                assert owner is not None
                index: list[Any] = [slice(None)] * owner.weight.ndim
                index[owner.out_axis] = off
                live = int(np.count_nonzero(owner.weight[tuple(index)])) + int(
                    np.count_nonzero(owner.bias()[off])
                )
                if live:
                    weight, bias = owner.weight.copy(), owner.bias().copy()
                    weight[tuple(index)] = 0
                    bias[off] = 0
                    self._set_layer(owner, weight, bias)
                    self.result.dead_parameters_zeroed += live
                    self._record(
                        Rewrite(
                            "zero_off_channels",
                            (owner.node.name, node.name),
                            True,
                            True,
                            detail=f"{int(off.sum())} always-OFF channels, {live} dead parameters zeroed",
                        )
                    )
                    changed = True
            if not (on | off).all() or (off.any() and not direct):
                continue
            if kind == "relu6" and not off.all():
                continue  # ReLU6 is the identity only below 6: no upper count is measured
            self._remove_rectifier(
                node, owner, f"{int(on.sum())} channels always ON, {int(off.sum())} always OFF"
            )
            changed = True
        if changed:
            self._commit()
        return changed

    def _remove_leaky(
        self, node: gs.Node, owner: LayerView | None, on: np.ndarray, off: np.ndarray
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
            self._set_layer(owner, owner.weight * factor.reshape(shape), owner.bias() * factor)
        self._remove_rectifier(
            node,
            owner,
            f"{int(on.sum())} channels always positive, {int(off.sum())} always negative "
            "(slope moved into the layer)",
        )
        return True

    def _remove_rectifier(self, node: gs.Node, owner: LayerView | None, detail: str) -> None:
        """Bypass a rectifier that acts as the identity; its owner's state says so."""
        self._bypass(node)
        if owner is not None:
            self._state(owner.node.name, "identity")
        self._record(Rewrite("remove_rectifier", (node.name,), True, True, detail=detail))

    def fold_constants(self) -> bool:
        for node in list(self.graph.nodes):
            layer = layer_view(node, self.graph)
            if (
                layer is not None
                and layer.float_exact
                and not layer.weight.any()
                and self._fold_constant_from(layer)
            ):
                self._commit()
                return True
        return False

    def _fold_constant_from(self, layer: LayerView) -> bool:
        """Push the constant output of an all-zero layer forward as far as it stays exact."""
        value = layer.bias().astype(np.float64)
        rank = layer.weight.ndim if layer.conv else 2
        tensor, chain = layer.node.outputs[0], []
        while True:
            consumer = single_consumer(tensor, self.graph)
            if consumer is None:
                break
            new_value = through_elementwise(consumer, tensor, value, rank)
            if new_value is not None:
                value, tensor = new_value, consumer.outputs[0]
                chain.append(consumer)
                continue
            if (
                consumer.op == "Add"
                and len(consumer.inputs) == 2
                and not any(isinstance(t, gs.Constant) for t in consumer.inputs)
            ):
                other = consumer.inputs[1] if consumer.inputs[0] is tensor else consumer.inputs[0]
                shape = (1, -1) + (1,) * (rank - 2) if layer.conv else (-1,)
                consumer.inputs = [
                    other,
                    self._constant(f"{consumer.name}.const", value.reshape(shape).astype(layer.weight.dtype)),
                ]
                self._state(layer.node.name, "removed")
                self._record(
                    Rewrite(
                        "fold_constant",
                        (layer.node.name, consumer.name),
                        True,
                        True,
                        detail="residual branch is constant: x + c",
                    )
                )
                return True
            nxt = layer_view(consumer, self.graph)
            if (
                nxt is not None
                and nxt.float_exact
                and nxt.node.inputs[0] is tensor
                and nxt.conv == layer.conv
            ):
                merged = self._constant_through(layer, value, nxt)
                if merged:
                    return True
            break
        if not chain:
            return False
        # Absorb the element-wise chain (BN, ReLU, affine constants) into the layer's bias.
        self._set_layer(layer, layer.weight, value)
        last = chain[-1].outputs[0]
        chain[-1].outputs = []
        layer.node.outputs = [last]
        self._state(layer.node.name, "constant")
        self._record(
            Rewrite(
                "fold_constant",
                (layer.node.name, *(n.name for n in chain)),
                True,
                True,
                detail="all-zero layer: element-wise ops folded into its bias",
            )
        )
        return True

    def _constant_through(self, layer: LayerView, value: np.ndarray, nxt: LayerView) -> bool:
        """Replace ``layer ... nxt`` by one all-zero layer whose bias is nxt's constant output."""
        if layer.conv:
            geo_a, geo_b = layer.geometry(), nxt.geometry()
            assert geo_a is not None and geo_b is not None
            if geo_b.padded and value.any():
                return False  # nxt's zero padding makes its output position dependent
            zeros = np.zeros((layer.out_channels, *layer.weight.shape[1:]), dtype=np.float64)
            merged = kernels.compose_conv(
                zeros, value, geo_a, nxt.weight.astype(np.float64), nxt.bias(), geo_b
            )
            weight, bias = np.zeros_like(merged.weight), merged.bias
            attrs = {
                "strides": list(merged.geometry.strides),
                "pads": list(merged.geometry.pads),
                "kernel_shape": list(weight.shape[2:]),
            }
            op = "Conv"
        else:
            m_b, c_b = nxt.dense()
            bias = value @ m_b + c_b
            weight = np.zeros((layer.dense()[0].shape[0], m_b.shape[1]))
            op, attrs = ("Gemm", {}) if "Gemm" in (layer.node.op, nxt.node.op) else ("MatMul", {})
        self._replace_pair(layer, nxt, op, attrs, weight, bias)
        self._state(layer.node.name, "removed")
        self._state(nxt.node.name, "constant")
        self._record(
            Rewrite(
                "fold_constant",
                (layer.node.name, nxt.node.name),
                True,
                True,
                detail="constant input: the next layer outputs a constant",
            )
        )
        return True

    def _replace_pair(
        self, a: LayerView, b: LayerView, op: str, attrs: dict, weight: np.ndarray, bias: np.ndarray
    ) -> gs.Node:
        name = self._name(f"{a.node.name}+{b.node.name}")
        dtype = a.weight.dtype
        inputs = [a.node.inputs[0], self._constant(f"{name}.weight", weight.astype(dtype))]
        if op != "MatMul":
            inputs.append(self._constant(f"{name}.bias", bias.astype(dtype)))
        node = gs.Node(op, name, attrs=attrs, inputs=inputs, outputs=list(b.node.outputs))
        b.node.outputs = []
        a.node.outputs = []
        self.graph.nodes.append(node)
        if op == "MatMul" and np.any(bias):
            self._matmul_bias(node, self._constant(f"{name}.bias", bias.astype(dtype)))
        return node

    def merges(self) -> bool:
        for node in list(self.graph.nodes):
            a = layer_view(node, self.graph)
            if a is None or not node.outputs:
                continue
            consumer = single_consumer(node.outputs[0], self.graph)
            b = layer_view(consumer, self.graph) if consumer is not None else None
            if b is None or b.node.inputs[0] is not node.outputs[0] or a.conv != b.conv:
                continue
            if not (a.float_exact and b.float_exact):
                continue
            if self._merge(a, b):
                self._commit()
                return True
        return False

    def _merge(self, a: LayerView, b: LayerView) -> bool:
        names = (a.node.name, b.node.name)
        growth = merge_mac_growth(a, b)
        if growth > 1.0:
            # Merging removes a layer but not work: two small kernels can become one large one.
            if not any((r.kind, r.nodes) == ("merge", names) for r in self.result.rewrites):
                detail = f"would multiply MACs by {growth:.2f}; skipped"
                self._record(Rewrite("merge", names, False, False, detail=detail))
            return False
        if a.conv:
            geo_a, geo_b = a.geometry(), b.geometry()
            assert geo_a is not None and geo_b is not None
            if geo_a.rank != geo_b.rank:
                return False
            merged = kernels.compose_conv(a.weight, a.bias(), geo_a, b.weight, b.bias(), geo_b)
            attrs = {
                "strides": list(merged.geometry.strides),
                "pads": list(merged.geometry.pads),
                "kernel_shape": list(merged.weight.shape[2:]),
            }
            if merged.exact:
                self._replace_pair(a, b, "Conv", attrs, merged.weight, merged.bias)
                self._record(Rewrite("merge", names, True, True, detail="Conv + Conv"))
            elif not self._try_inexact(a, b, attrs, merged):
                return False
        else:
            m_a, c_a = a.dense()
            m_b, c_b = b.dense()
            m, c = kernels.compose_dense(m_a, c_a, m_b, c_b)
            # A Gemm on either side means a rank-2 input, which Gemm accepts.
            op = "Gemm" if "Gemm" in (a.node.op, b.node.op) else "MatMul"
            self._replace_pair(a, b, op, {}, m, c)
            self._record(Rewrite("merge", names, True, True, detail=f"{a.node.op} + {b.node.op}"))
        for name in names:
            self._state(name, "merged")
        return True

    def _try_inexact(self, a: LayerView, b: LayerView, attrs: dict, merged: kernels.ConvMerge) -> bool:
        names = (a.node.name, b.node.name)
        key = ("merge", names)
        if any((r.kind, r.nodes) == key for r in self.result.rewrites):
            return False  # measured and declined before
        if self.measure is None or self.tolerance <= 0:
            self._record(Rewrite("merge", names, False, False, detail="not exact at the borders; skipped"))
            return False
        original = self.graph
        self.graph = original.copy()
        by_name = {n.name: n for n in self.graph.nodes}
        ta, tb = layer_view(by_name[a.node.name], self.graph), layer_view(by_name[b.node.name], self.graph)
        assert ta is not None and tb is not None
        self._replace_pair(ta, tb, "Conv", attrs, merged.weight, merged.bias)
        self._commit()
        error = self.measure(gs.export_onnx(self.graph))
        accepted = error <= self.tolerance
        if not accepted:
            self.graph = original
        self._record(
            Rewrite(
                "merge",
                names,
                False,
                accepted,
                error=error,
                detail=f"not exact at the borders; measured {error:.2e} vs tolerance {self.tolerance:g}",
            )
        )
        return accepted

    def fold_residuals(self) -> bool:
        for node in list(self.graph.nodes):
            if (
                node.op != "Add"
                or len(node.inputs) != 2
                or any(isinstance(t, gs.Constant) for t in node.inputs)
            ):
                continue
            first, second = node.inputs
            for branch, other in ((first, second), (second, first)):
                if self._fold_residual(node, branch, other):
                    self._commit()
                    return True
        return False

    def _fold_residual(self, add: gs.Node, branch: gs.Tensor, other: gs.Tensor) -> bool:
        producer = branch.inputs[0] if branch.inputs else None
        f = layer_view(producer, self.graph) if producer is not None else None
        if f is None or not f.conv or not f.float_exact or not feeds_only(branch, add, self.graph):
            return False
        geo = f.geometry()
        assert geo is not None
        k = f.weight.shape[2:]
        centred = all(geo.pads[j] == geo.pads[j + geo.rank] == (k[j] - 1) // 2 for j in range(geo.rank))
        x = f.node.inputs[0]
        if not centred:
            return False
        parts: tuple[str, ...]
        if other is x and all(s == 1 for s in geo.strides) and f.weight.shape[0] == f.weight.shape[1]:
            weight, bias, parts = kernels.add_identity(f.weight), f.bias(), (f.node.name, add.name)
        else:
            p_node = other.inputs[0] if other.inputs else None
            p = layer_view(p_node, self.graph) if p_node is not None else None
            if (
                p is None
                or not p.conv
                or not p.float_exact
                or p.node.inputs[0] is not x
                or not feeds_only(other, add, self.graph)
            ):
                return False
            p_geo = p.geometry()
            if (
                p_geo is None
                or p_geo.padded
                or p_geo.strides != geo.strides
                or any(d != 1 for d in p.weight.shape[2:])
            ):
                return False
            weight, bias = kernels.add_identity(f.weight, p.weight), f.bias() + p.bias()
            parts = (f.node.name, p.node.name, add.name)
            self._state(p.node.name, "merged")
        if weight is None:
            return False
        self._set_layer(f, weight, bias)
        f.node.outputs = list(add.outputs)
        add.outputs = []
        self._state(f.node.name, "merged")
        self._record(
            Rewrite("fold_residual", parts, True, True, detail="shortcut folded into the centre tap")
        )
        return True


def _removable_kind(node: gs.Node) -> str | None:
    """relu, relu6 (a Clip with min 0) or leaky (LeakyRelu/PRelu) for activations surgery may remove."""
    if node.op == "Relu":
        return "relu"
    if node.op in ("LeakyRelu", "PRelu"):
        return "leaky"
    bounds = clip_bounds(node) if node.op == "Clip" else None
    if bounds is None or bounds[0] != 0.0:
        return None
    return "relu" if np.isinf(bounds[1]) else "relu6"


def _slope(node: gs.Node, owner: LayerView) -> np.ndarray | None:
    """The negative-side slope of a LeakyRelu/PRelu per owner channel, None when not per-channel."""
    channels = owner.out_channels
    if node.op == "LeakyRelu":
        return np.full(channels, float(node.attrs.get("alpha", 0.01)))
    value = const(node.inputs[1]) if len(node.inputs) > 1 else None
    if value is None:
        return None
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    rank = owner.weight.ndim if owner.conv else 2
    # PRelu broadcasts the slope from the right: per channel means (C, 1, ...) under (N, C, ...)
    # for a Conv, (C,) on the last axis of a dense layer's output
    shape = (1,) * (rank - value.ndim) + value.shape
    axis = 1 if owner.conv else rank - 1
    if value.ndim <= rank and value.size == channels and shape[axis] == channels:
        return value.reshape(-1).astype(np.float64)
    return None


def simplify(
    model: onnx.ModelProto,
    stats: Mapping[str, ChannelStates],
    measure: Measure | None = None,
    tolerance: float = 0.0,
) -> SurgeryResult:
    """Rewrite ``model`` into a shallower equivalent; the input is not modified.

    Args:
        model: the (pruned) model.
        stats: rectifier node name -> channel states measured on the calibration data.
        measure: returns the relative output error of a candidate model; used for merges that
            are not exact.
        tolerance: the largest measured error at which an inexact merge is applied (0: never).

    """
    surgeon = _Surgeon(model, stats, measure, tolerance)
    passes = (
        surgeon.fold_batchnorms,
        surgeon.rectifiers,
        surgeon.fold_constants,
        surgeon.merges,
        surgeon.fold_residuals,
    )
    surgeon._commit()
    # Every productive pass deletes a node or zeroes a rectifier's dead channels (once each), so
    # this bound is never the reason to stop; it guards against a rewrite that undoes another.
    for _ in range(2 * len(surgeon.graph.nodes) + 10):
        if not any(p() for p in passes):
            break
    else:
        log.warning("graph surgery stopped at its round limit; the result is valid but may not be minimal")
    surgeon._commit()
    out = export_model(surgeon.graph)
    out.ir_version = model.ir_version
    del out.graph.value_info[:]
    surgeon.result.model = out
    result = surgeon.result
    # The graph is a web of cycles (every tensor knows its producers and consumers): reference
    # counting never frees it, and until the collector runs its weights stay in memory (0.9 GB
    # for VGG-19) while the rewritten model is checked. A full collection costs time in
    # proportion to everything the process holds, so it runs for large models only (on every
    # call it doubled the test suite's time: 99 -> 203 s).
    del surgeon, passes  # the passes are its bound methods
    if serialized_size(out) >= COLLECT_BYTES:
        gc.collect()
    # Layers that no longer appear in the graph (dead branches cleaned up) are removed.
    present = {part for node in out.graph.node for part in node.name.split("+")}
    for node in model.graph.node:
        if node.op_type in LAYER_OPS and node.name not in present:
            result.states[node.name] = "removed"
    return result


def merge_mac_growth(a: LayerView, b: LayerView) -> float:
    """MACs of the merged layer over those of A then B, per output position of B.

    A runs at s_B^rank positions per output position of B; the merged kernel is
    k_A + s_A (k_B - 1) wide. Padding at the borders is ignored.
    """
    if not a.conv:
        inputs, middle = a.dense()[0].shape
        outputs = b.dense()[0].shape[1]
        return inputs * outputs / (inputs * middle + middle * outputs)
    geo_a, geo_b = a.geometry(), b.geometry()
    assert geo_a is not None and geo_b is not None
    mid, cin, *k_a = a.weight.shape
    cout, _, *k_b = b.weight.shape
    positions_a = float(np.prod(geo_b.strides))
    merged_kernel = np.prod([ka + sa * (kb - 1) for ka, kb, sa in zip(k_a, k_b, geo_a.strides, strict=True)])
    before = positions_a * mid * cin * np.prod(k_a) + cout * mid * np.prod(k_b)
    return float(cout * cin * merged_kernel / before)
