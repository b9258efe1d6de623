"""Cut removed channels out of the initializers, so that the graph itself is narrower.

The groups are graph/channels.py's; for each, the removed channel indices are deleted from every
slice of the group (producer rows, bias, BatchNormalization vectors, per-channel constants,
depthwise filters) and the matching columns from every consumer's weight. A layer that is the
consumer of one group and the producer of another loses both, from the same initializer. The
narrowed tensors' shape records in ``value_info`` are inferred again.

A residual branch whose channels all go (:func:`without_branch`) leaves the graph whole: its
nodes and the initializers only they read are deleted, and the Add reads a per-channel constant
instead, the block ``x + F(x)`` becoming ``x + c`` (as a BatchNormalization of unit scale).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from egp_onnx.graph.channels import Branch, ChannelGroup, constant_names
from egp_onnx.graph.weights import drop_unread, replace_initializers, shape_skeleton


def narrowed(
    model: onnx.ModelProto,
    groups: Sequence[ChannelGroup],
    removed: Mapping[str, np.ndarray],
    values: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` without the channels ``removed[producer]`` (indices) of each group.

    ``values``: arrays of ``model``'s initializers already read (used instead of reading them).
    Every group keeps at least one channel: a group asked to lose all is an error of the caller.

    Raises:
        ValueError: a group would lose every channel, or an index is out of range.

    """
    cuts: dict[str, dict[int, set[int]]] = {}
    group_attrs: dict[str, int] = {}
    narrowed_tensors: set[str] = set()
    for group in groups:
        drop = np.unique(np.asarray(removed.get(group.producer, ()), dtype=np.int64))
        if drop.size == 0:
            continue
        if drop.size >= group.channels or drop.min() < 0 or drop.max() >= group.channels:
            raise ValueError(f"{group.producer}: cannot remove channels {drop.tolist()} of {group.channels}")
        for name, axis in group.slices:
            cuts.setdefault(name, {}).setdefault(axis, set()).update(drop.tolist())
        for consumer in group.consumers:
            columns = consumer.offset + (drop[:, None] * consumer.per + np.arange(consumer.per)[None, :])
            cuts.setdefault(consumer.weight, {}).setdefault(consumer.axis, set()).update(
                columns.ravel().tolist()
            )
        for node in group.grouped:
            group_attrs[node] = group.channels - drop.size
        narrowed_tensors.update(group.tensors)
    if not cuts:
        return model
    known = values or {}
    arrays: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if tensor.name not in cuts:
            continue
        array = known.get(tensor.name)
        if array is None:
            array = numpy_helper.to_array(tensor)
        for axis, indices in cuts[tensor.name].items():
            array = np.delete(array, sorted(indices), axis=axis)
        arrays[tensor.name] = array
    out = replace_initializers(model, arrays)
    for node in out.graph.node:
        if node.name in group_attrs:
            for attribute in node.attribute:
                if attribute.name == "group":
                    attribute.CopyFrom(helper.make_attribute("group", group_attrs[node.name]))
    return _shapes_again(out)


def without_branch(model: onnx.ModelProto, branch: Branch, constant: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` in which ``branch``'s residual Add becomes ``x + constant`` (C,), its nodes gone.

    ``x + c`` is written as a BatchNormalization of unit scale and zero mean (``epsilon`` 0: exact):
    onnxruntime fuses it into the layer before or runs it in its blocked channel layout (NCHWc),
    where an Add of a broadcast constant would take the tensor out of that layout and back (two
    reorders: on the MNIST sample they cost more than the block's 1x1 projection).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    gone = {*branch.nodes, branch.add}
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    dtype = helper.tensor_dtype_to_np_dtype(types.get(branch.operand) or onnx.TensorProto.FLOAT)
    nodes = []
    for node in graph.node:
        name = node.name or node.output[0]
        if name == branch.add:
            other = next(t for t in node.input if t != branch.operand)
            params = constant_names(branch.add)
            values = (np.ones(branch.channels), constant, np.zeros(branch.channels), np.ones(branch.channels))
            graph.initializer.extend(
                numpy_helper.from_array(np.asarray(v, dtype=dtype).reshape(-1), n)
                for n, v in zip(params, values, strict=True)
            )
            shift = helper.make_node(
                "BatchNormalization", [other, *params], [node.output[0]], name, epsilon=0.0
            )
            nodes.append(shift)
        elif name not in gone:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unread(graph)
    return _shapes_again(out)


def _shapes_again(out: onnx.ModelProto) -> onnx.ModelProto:
    """``out`` (modified in place) with its ``value_info`` inferred again."""
    # Shape records of tensors downstream of a narrowed one may be stale too (a Concat's output):
    # all are inferred again, on the graph without its weights' values.
    del out.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(shape_skeleton(out))
    out.graph.value_info.extend(inferred.graph.value_info)
    return out
