"""Two layers in a row merged into one once no rectifier separates them.

Dense merges are exact by algebra, and so are conv merges unless the second conv pads (then the
merged conv differs on a ring at the borders). Such a merge is applied only when the caller's
measurement keeps the output error within the tolerance; a merge that would add MACs is never
applied. Every declined merge is recorded once, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from egp_onnx.surgery import algebra
from egp_onnx.surgery.registry import register_rewrite
from egp_onnx.surgery.surgeon import Surgeon
from egp_onnx.surgery.view import LayerView, layer_view, single_consumer

NAME = "merge"


@register_rewrite(NAME, order=40, licence="algebra")
def merges(s: Surgeon) -> bool:
    """Merge the first layer whose output only the next layer of the same family reads."""
    for node in list(s.graph.nodes):
        a = layer_view(node, s.graph)
        if a is None or not node.outputs:
            continue
        consumer = single_consumer(node.outputs[0], s.graph)
        b = layer_view(consumer, s.graph) if consumer is not None else None
        if b is None or b.node.inputs[0] is not node.outputs[0] or a.conv != b.conv:
            continue
        if not (a.float_exact and b.float_exact):
            continue
        if _merge(s, a, b):
            s.commit()
            return True
    return False


def _merge(s: Surgeon, a: LayerView, b: LayerView) -> bool:
    names = (a.node.name, b.node.name)
    growth = merge_mac_growth(a, b)
    if growth > 1.0:
        # Merging removes a layer but not work: two small kernels can become one large one.
        if not s.recorded(NAME, names):
            detail = f"would multiply MACs by {growth:.2f}; skipped"
            s.record(NAME, names, exact=False, applied=False, detail=detail)
        return False
    if a.conv:
        geo_a, geo_b = a.geometry(), b.geometry()
        assert geo_a is not None and geo_b is not None
        if geo_a.rank != geo_b.rank:
            return False
        merged = algebra.compose_conv(a.weight, a.bias(), geo_a, b.weight, b.bias(), geo_b)
        attrs = {
            "strides": list(merged.geometry.strides),
            "pads": list(merged.geometry.pads),
            "kernel_shape": list(merged.weight.shape[2:]),
        }
        if merged.exact:
            s.replace_pair(a, b, "Conv", attrs, merged.weight, merged.bias)
            s.record(NAME, names, exact=True, applied=True, detail="Conv + Conv")
        elif not _try_inexact(s, a, b, attrs, merged):
            return False
    else:
        m_a, c_a = a.dense()
        m_b, c_b = b.dense()
        m, c = algebra.compose_dense(m_a, c_a, m_b, c_b)
        # A Gemm on either side means a rank-2 input, which Gemm accepts.
        op = "Gemm" if "Gemm" in (a.node.op, b.node.op) else "MatMul"
        s.replace_pair(a, b, op, {}, m, c)
        s.record(NAME, names, exact=True, applied=True, detail=f"{a.node.op} + {b.node.op}")
    for name in names:
        s.state(name, "merged")
    return True


def _try_inexact(s: Surgeon, a: LayerView, b: LayerView, attrs: dict, merged: algebra.ConvMerge) -> bool:
    """Apply a conv merge that is not exact if the measured output error is within the tolerance."""
    names = (a.node.name, b.node.name)
    if s.recorded(NAME, names):
        return False  # measured and declined before
    if s.measure is None or s.tolerance <= 0:
        s.record(NAME, names, exact=False, applied=False, detail="not exact at the borders; skipped")
        return False
    original = s.graph
    s.graph = original.copy()
    by_name = {n.name: n for n in s.graph.nodes}
    ta, tb = layer_view(by_name[a.node.name], s.graph), layer_view(by_name[b.node.name], s.graph)
    assert ta is not None and tb is not None
    s.replace_pair(ta, tb, "Conv", attrs, merged.weight, merged.bias)
    s.commit()
    error = s.measure(gs.export_onnx(s.graph))
    accepted = error <= s.tolerance
    if not accepted:
        s.graph = original
    detail = f"not exact at the borders; measured {error:.2e} vs tolerance {s.tolerance:g}"
    s.record(NAME, names, exact=False, applied=accepted, error=error, detail=detail)
    return accepted


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
