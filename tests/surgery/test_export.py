"""surgery.export: the same ONNX bytes as onnx-graphsurgeon's exporter, with fewer weight copies."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from models import Builder
from onnx import numpy_helper

from egp_onnx.surgery.export import SMALL_ELEMENTS, export_model


def three_convs(rng):
    """
    x(N,3,6,6) -> Conv3x3 a (3->8) -> Relu -> Conv3x3 b (8->8) -> Relu -> Conv1x1 c (8->2) -> y
    """
    b = Builder(rng)
    h = b.op("Relu", [b.conv("x", "a", 3, 8, 3, pad=1)], "r1")
    h = b.op("Relu", [b.conv(h, "b", 8, 8, 3, pad=1)], "r2")
    return b.model(b.conv(h, "c", 8, 2, 1), ["N", 3, 6, 6])


def test_export_is_byte_identical_to_graph_surgeons(rng):
    model = three_convs(rng)
    before = model.SerializeToString()
    graph = gs.import_onnx(model)
    constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    sizes = {name: int(np.prod(c.shape)) for name, c in constants.items()}
    assert max(sizes.values()) > SMALL_ELEMENTS >= min(sizes.values()), "large and small constants"
    # changed: a large one (as surgery's _set_layer writes it) and a small one; the rest stay lazy
    large = next(n for n, s in sizes.items() if s > SMALL_ELEMENTS)
    small = next(n for n, s in sizes.items() if s <= SMALL_ELEMENTS)
    constants[large].values = (constants[large].values * 0.5).astype(np.float32)
    constants[small].values = constants[small].values + np.float32(1)
    # a float16 array and a non-contiguous one
    b_weight = next(n for n in constants if n != large and sizes[n] > SMALL_ELEMENTS)
    constants[b_weight].values = np.asfortranarray(constants[b_weight].values)
    half = gs.Constant("half", rng.normal(size=(SMALL_ELEMENTS + 1,)).astype(np.float16))
    graph.outputs.append(gs.Variable("half_out", dtype=np.float16, shape=half.shape))
    graph.nodes.append(gs.Node("Identity", "keep_half", inputs=[half], outputs=[graph.outputs[-1]]))
    ours = export_model(graph).SerializeToString()
    assert model.SerializeToString() == before, "the imported model is not modified"
    theirs = gs.export_onnx(graph).SerializeToString()
    assert ours == theirs
    exported = onnx.load_from_string(ours)
    values = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    np.testing.assert_array_equal(values[large], constants[large].values)
    np.testing.assert_array_equal(values["half"], half.values)
    assert isinstance(constants[large].values, np.ndarray), "the graph keeps its values"
