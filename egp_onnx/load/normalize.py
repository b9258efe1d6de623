"""Load-time normalisation: real exporters' graphs into the form the rest of egp-onnx reads.

- Weights kept outside initializers (paddle2onnx's ``Constant`` nodes, the Caffe2 zoo's
  ``ConstantOfShape`` fills, ``Unsqueeze``/``Mul``/``Add`` chains of initializers such as a
  BatchNormalization written as Mul/Add) are folded into initializers, so that layers whose
  weight is computed from constants become prunable. The folding is onnx-graphsurgeon's
  (:func:`egp_onnx.surgery.fold.fold_constants`), not ours.
- Initializers also listed in ``graph.input`` (every IR < 4 model; some older exporters at
  IR >= 4, where they are overridable defaults) are taken out of the inputs and the IR version
  is raised to 4 where it was lower: their values are the model's weights, which egp-onnx
  prunes, and the statistics model drops some of them, which would otherwise leave inputs that
  onnxruntime asks to be fed. IR 4 is as old as opset 9, so the same onnxruntime loads the result.
- Initializers read only inside Loop/If bodies stay (graph-surgeon's cleanup keeps outer-scope
  tensors that subgraphs read).
"""

from __future__ import annotations

import logging

import onnx

from egp_onnx.errors import one_line
from egp_onnx.graph.walk import subgraphs

log = logging.getLogger(__name__)

#: The first IR version in which initializers need not be graph inputs.
MIN_IR_VERSION = 4

_FOLDED_OPS = ("Constant", "ConstantOfShape")


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The normalised form of ``model`` (a new ModelProto when anything changes; never modified).

    Folding that graph-surgeon cannot do is skipped with a log message: the model still loads,
    with those weights left where the exporter put them.
    """
    out = model
    if needs_folding(model.graph):
        try:
            folded = without_initializer_inputs(_fold(model))  # IR 3 checks need this first
            onnx.checker.check_model(folded)
            out = folded
        except Exception as exc:  # graph-surgeon, onnxruntime and the checker raise their own types
            log.warning("constant folding skipped: %s", one_line(exc))
    return without_initializer_inputs(out)


def _fold(model: onnx.ModelProto) -> onnx.ModelProto:
    from egp_onnx.runtime.session import quiet
    from egp_onnx.surgery.fold import fold_constants

    quiet()  # graph-surgeon evaluates the constants in onnxruntime sessions of its own
    return fold_constants(model)


def needs_folding(graph: onnx.GraphProto) -> bool:
    """True when a node of ``graph`` is a Constant/ConstantOfShape or reads only constants."""
    constants = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type in _FOLDED_OPS:
            return True
        inputs = [i for i in node.input if i]
        if inputs and not subgraphs(node) and all(i in constants for i in inputs):
            return True
    return False


def without_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without graph inputs that name initializers, at IR >= 4 (a copy if it changes)."""
    initializers = {t.name for t in model.graph.initializer}
    listed = any(i.name in initializers for i in model.graph.input)
    if not listed and model.ir_version >= MIN_IR_VERSION:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [i for i in copy.graph.input if i.name not in initializers]
    del copy.graph.input[:]
    copy.graph.input.extend(kept)
    copy.ir_version = max(copy.ir_version, MIN_IR_VERSION)
    return copy
