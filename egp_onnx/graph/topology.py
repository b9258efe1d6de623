"""The old home of graph/'s names: index.py, ops.py, layers.py, rectifiers.py and weights.py now."""

# re-export for the merge of issue 20; the lead removes it
from egp_onnx.graph.index import GraphIndex  # noqa: F401
from egp_onnx.graph.layers import Layer, layer_of  # noqa: F401
from egp_onnx.graph.ops import LAYER_OPS, RECTIFIER_OPS, REMOVABLE_KINDS, REPORTED_ACTIVATIONS  # noqa: F401
from egp_onnx.graph.rectifiers import RectifierSite, find_rectifiers, prunable_layers  # noqa: F401
from egp_onnx.graph.weights import (  # noqa: F401
    IN_MEMORY,
    SKELETON_MAX_ELEMENTS,
    count_parameters,
    initializer_arrays,
    initializer_counts,
    numpy_helper,
    replace_initializers,
    replace_tensors,
    serialized_size,
    shape_skeleton,
    split_weights,
    static_shapes,
    tensor_values,
)
