"""The subgraph walker: bodies of If and Loop, nested, in order."""

from __future__ import annotations

from onnx import TensorProto, helper

from egp_onnx.graph.walk import graph_names, graphs, nodes, reads, subgraphs


def _body(name: str, node: object, out: str) -> object:
    return helper.make_graph([node], name, [], [helper.make_empty_tensor_value_info(out)])


def test_reads_include_what_subgraph_bodies_read_from_the_outer_scope():
    then = helper.make_graph(
        [helper.make_node("Add", ["outer_a", "outer_b"], ["t"])],
        "then",
        [],
        [helper.make_empty_tensor_value_info("t")],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["outer_c"], ["e"])],
        "else",
        [],
        [helper.make_empty_tensor_value_info("e")],
    )
    node = helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=other)
    assert sorted(reads(node)) == ["cond", "outer_a", "outer_b", "outer_c"]


def test_nested_bodies_are_walked_depth_first_and_named():
    """
    main: If(cond) -> out
            then: Loop(n) -> t    (body: Add(outer_a, i) -> s)
            else: Identity(outer_c) -> e
    """
    inner = helper.make_graph(
        [helper.make_node("Add", ["outer_a", "i"], ["s"], name="add")],
        "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, [])],
        [helper.make_empty_tensor_value_info("s")],
    )
    loop = helper.make_node("Loop", ["n", ""], ["t"], body=inner, name="loop")
    then = _body("then", loop, "t")
    other = _body("else", helper.make_node("Identity", ["outer_c"], ["e"], name="identity"), "e")
    branch = helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=other, name="if")
    main = helper.make_graph([branch], "main", [], [helper.make_empty_tensor_value_info("out")])
    # onnx.helper sorts a node's attributes by name: else_branch comes first
    assert [g.name for g in subgraphs(branch)] == ["else", "then"]
    assert [g.name for g in graphs(main)] == ["main", "else", "then", "loop_body"]
    assert [n.name for n in nodes(main)] == ["if", "identity", "loop", "add"]
    assert reads(branch) == ["cond", "outer_c", "n", "outer_a", "i"]
    nodes_and_tensors = {"if", "loop", "add", "identity", "cond", "out", "n", "t", "outer_a", "i", "s"}
    assert graph_names(main) == nodes_and_tensors | {"outer_c", "e", ""}  # "": Loop's unset input
