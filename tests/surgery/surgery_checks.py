"""What the surgery tests share: one rewrite run alone, the whole surgery through compress, and the
three checks of a rewritten model (structure, onnxruntime numbers, independent expectations)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from models import f32
from onnx import numpy_helper
from references import reference_activations, run_ort

import egp_onnx
from egp_onnx.surgery import ChannelStates, SurgeryResult, simplify
from egp_onnx.surgery.registry import REWRITES

#: A sparsity target that rounds to zero weights, so no weight is pruned, but above 0, so the
#: statistics-based rewrites (always-ON / always-OFF channels) are allowed: every change comes from
#: the statistics and from algebra. (``sparsity=0`` allows exact algebra only.)
STATISTICS_ONLY = 1e-9


def alone(name: str, model: onnx.ModelProto, stats=None, **kwargs) -> SurgeryResult:
    """``simplify`` with every registered rewrite skipped but ``name``; the result passes onnx.checker."""
    result = simplify(model, stats or {}, skip=[other for other in REWRITES if other != name], **kwargs)
    onnx.checker.check_model(result.model, full_check=True)
    return result


def surgery(model, x_calib, tmp_path, **kwargs):
    """The whole compress pipeline with no weight pruned: only surgery changes the model."""
    np.savez(tmp_path / "calib.npz", x=x_calib)
    kwargs = {"sparsity": STATISTICS_ONLY, "holdout": 0.0, "reconstruct": False, "guard": False, **kwargs}
    result = egp_onnx.compress(model, tmp_path / "calib.npz", **kwargs)
    onnx.checker.check_model(result.model, full_check=True)
    return result


def channel_states(model: onnx.ModelProto, x: np.ndarray, inputs: dict[str, str]) -> dict[str, ChannelStates]:
    """Rectifier node -> which channels of its input are always > 0 / always <= 0 on ``x``.

    Computed from a plain onnxruntime run, independently of egp-onnx's statistics; ``inputs`` maps
    each rectifier node to its input tensor. The channel axis is 1.
    """
    acts = reference_activations(model, list(inputs.values()), {"x": x})
    states = {}
    for node, tensor in inputs.items():
        a = np.moveaxis(acts[tensor], 1, 0).reshape(acts[tensor].shape[1], -1)
        states[node] = ChannelStates((a > 0).all(axis=1), (a <= 0).all(axis=1))
    return states


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node(model: onnx.ModelProto, name_part: str) -> onnx.NodeProto:
    """The one node whose name contains ``name_part``."""
    (found,) = [n for n in model.graph.node if name_part in n.name]
    return found


def assert_same(original, rewritten, x, rtol=1e-4):
    want, got = run_ort(original, {"x": x})[0], run_ort(rewritten, {"x": x})[0]
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) <= rtol * np.linalg.norm(want)


def positive(rng, shape) -> np.ndarray:
    return f32(rng.uniform(0.1, 1.0, shape))


def applied(result, kind: str) -> list:
    """The applied rewrites of ``kind`` of a compress result or a SurgeryResult."""
    rewrites = result.rewrites if isinstance(result, SurgeryResult) else result.report.surgery.rewrites
    return [r for r in rewrites if r.kind == kind and r.applied]
