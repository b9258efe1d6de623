"""Walking a graph and its subgraphs (the bodies of Loop, If and Scan): pure ONNX.

A node's bodies are graphs held in its attributes. They read outer-scope tensors by name, so
whatever asks "which names does this graph use" or "which tensors does this node read" must walk
into them; these are the walkers every such question uses.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies of ``node`` (graph and graph-list attributes), in attribute order."""
    bodies = []
    for attr in node.attribute:
        if attr.type == attr.GRAPH:
            bodies.append(attr.g)
        elif attr.type == attr.GRAPHS:
            bodies.extend(attr.graphs)
    return bodies


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph``, then every body of its nodes and of theirs, depth first."""
    yield graph
    for node in graph.node:
        for body in subgraphs(node):
            yield from graphs(body)


def nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs, each just before the nodes of its bodies."""
    for node in graph.node:
        yield node
        for body in subgraphs(node):
            yield from nodes(body)


def graph_names(graph: onnx.GraphProto) -> set[str]:
    """Every node and tensor name of ``graph`` and its subgraphs."""
    names: set[str] = set()
    for g in graphs(graph):
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in [*g.input, *g.output])
        for node in g.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
    return names


def reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs and the outer-scope names its bodies read (Loop, If, Scan)."""
    names = [t for t in node.input if t]
    for body in subgraphs(node):
        names.extend(t for inner in nodes(body) for t in inner.input if t)
    return names
