"""A model's tensors over a fixed set of batches, computed segment by segment and kept while live.

Reconstruction refits layers in topological order, and each layer needs tensors of the model as
refit so far. Running the model's prefix again for every layer costs about a pass per layer.
Instead, :class:`Activations` keeps the tensors it has computed (one array per batch) and each
request runs only the nodes between the kept tensors and the ones asked for, in one onnxruntime
session. Every node therefore runs once per batch, with the weights it has when it first runs: the
caller updates the weights dict between requests, and a layer's refit reaches every later request.

A kept tensor is dropped as soon as every node that reads it has run and no later request names
it. The graph inputs stay (a node is recomputed from them should a dropped tensor be needed again).
When the kept tensors would pass the byte budget, the last batches are dropped, for every tensor
alike: later requests see fewer samples, and memory stays bounded whatever the sample count.
The batches may come in parts (consecutive runs, each with its own budget): each part keeps its
first batches, decided from its own first batch, so the batches a part keeps are the same whether
it is computed here with the others or alone (on a cluster worker).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from egp_onnx.graph.walk import reads
from egp_onnx.runtime.session import SEGMENTS, make_session, run_session


class Activations:
    """Tensors of ``model`` for ``batches``, computed on request, one array per batch.

    Args:
        model: the graph; initializers that are stubs take their values from ``weights``.
        weights: values of the stubs; the caller may change them between requests.
        batches: the feeds, in order (each a dict of graph input arrays).
        budget: bytes the kept tensors may take; beyond it the last batches are dropped. With
            ``parts``, one budget per part.
        threads: onnxruntime's intra-op threads per segment (0: its default, one per core).
        parts: batches per part, in order (None: one part of every batch).

    """

    def __init__(
        self,
        model: onnx.ModelProto,
        weights: Mapping[str, np.ndarray],
        batches: Sequence[Mapping[str, np.ndarray]],
        budget: int | Sequence[int],
        threads: int = 0,
        parts: Sequence[int] | None = None,
    ) -> None:
        if not batches:
            raise ValueError("no batches to compute tensors for")
        sizes = [len(batches)] if parts is None else list(parts)
        budgets = [budget] if isinstance(budget, int) else list(budget)
        if sum(sizes) != len(batches) or len(budgets) != len(sizes) or min(sizes) < 1:
            raise ValueError("parts must cover the batches, each with a budget")
        self.model, self.weights, self.budgets, self.threads = model, weights, budgets, threads
        self.nodes = list(model.graph.node)
        self.producer = {out: i for i, node in enumerate(self.nodes) for out in node.output if out}
        self.reads = [reads(node) for node in self.nodes]  # bodies walked once, not per request
        self.readers: dict[str, set[int]] = defaultdict(set)
        for i, names in enumerate(self.reads):
            for tensor in names:
                self.readers[tensor].add(i)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.inputs = {v.name: v for v in model.graph.input if v.name not in self.initializers}
        self.cache: dict[str, list[np.ndarray]] = {
            name: [batch[name] for batch in batches] for name in self.inputs if name in batches[0]
        }
        self.batches = len(batches)
        # Per batch, its input bytes per sample relative to batch 0's: batches of images of other
        # sizes take that much more or less per sample (1 for every batch of data of one shape).
        # The part of each kept batch, and its size relative to its part's first batch.
        self.part_of = [p for p, size in enumerate(sizes) for _ in range(size)]
        per_sample = [sum(a.nbytes / max(len(a), 1) for a in batch.values()) for batch in batches]
        firsts = np.repeat(np.cumsum([0, *sizes[:-1]]), sizes)
        self.scales = np.array(per_sample) / np.array([per_sample[i] or 1.0 for i in firsts])
        self.done: set[int] = set()
        self.sessions = 0  # segments run so far (one onnxruntime session each)

    def get(self, names: Sequence[str], later: Collection[str] = ()) -> list[list[np.ndarray]]:
        """The named tensors, each as one array per kept batch.

        ``later`` names the tensors that later requests will ask for: they are kept when computed
        on the way, and not dropped. Tensors nothing will read again leave the cache on return.
        """
        wanted = list(dict.fromkeys(names))
        self._drop_dead({*wanted, *later})
        missing = [name for name in wanted if name not in self.cache]
        if missing:
            self._run(missing, set(later))
        found = [self.cache[name][: self.batches] for name in names]
        self._drop_dead(later)
        return found

    def _drop_dead(self, wanted: Collection[str]) -> None:
        for name in list(self.cache):
            if name not in wanted and name not in self.inputs and not self.readers[name] - self.done:
                del self.cache[name]

    def _needed(self, missing: Sequence[str]) -> list[int]:
        """Indices of the nodes that compute ``missing`` from the kept tensors, in graph order."""
        needed: set[int] = set()
        stack, seen = list(missing), set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor in self.cache or tensor in self.initializers:
                continue
            seen.add(tensor)
            i = self.producer.get(tensor)
            if i is None:
                if tensor in self.inputs:
                    raise ValueError(f"graph input {tensor!r} has no value in the batches")
                continue  # a name read only inside a body, defined there
            if i not in needed:
                needed.add(i)
                stack.extend(self.reads[i])
        return sorted(needed)

    def _run(self, missing: Sequence[str], later: Collection[str]) -> None:
        order = self._needed(missing)
        segment = set(order)
        # Keep what this request wants, what later requests name, and what nodes outside the
        # segment that have not run yet will read.
        keep = [
            out
            for i in order
            for out in self.nodes[i].output
            if out and (out in missing or out in later or self.readers[out] - self.done - segment)
        ]
        read = list(dict.fromkeys(t for i in order for t in self.reads[i]))
        fed = [t for t in read if t in self.cache]
        part = self._model(order, fed, keep, read)
        # Worker threads that sleep when idle: between runs the caller computes with numpy (its
        # BLAS threads), which spinning workers would take the cores from.
        session = make_session(part, SEGMENTS, weights=self.weights, threads=self.threads)
        self.sessions += 1
        b = 0
        while b < self.batches:
            results = run_session(session, keep, {t: self.cache[t][b] for t in fed})
            for name, value in zip(keep, results, strict=True):
                self.cache.setdefault(name, []).append(value)
            if b == 0 or self.part_of[b] != self.part_of[b - 1]:
                self._fit_budget(b)
            b += 1
        self.done |= segment

    def _fit_budget(self, first: int) -> None:
        """Drop the last batches of the part that starts at kept batch ``first`` past its budget.

        Each batch is estimated from the part's first batch's size, scaled by its per-sample input size.
        """
        part = self.part_of[first]
        end = first + self.part_of.count(part)
        per_batch = max(sum(arrays[first].nbytes for arrays in self.cache.values()), 1)
        kept = np.cumsum(per_batch * self.scales[first:end])
        allowed = max(1, int(np.searchsorted(kept, self.budgets[part], side="right")))
        if first + allowed < end:
            cut = slice(first + allowed, end)
            self.batches -= end - cut.start
            for arrays in self.cache.values():
                del arrays[cut]
            del self.part_of[cut]
            self.scales = np.delete(self.scales, np.arange(cut.start, end))

    def _model(self, order: list[int], fed: list[str], keep: list[str], read: list[str]) -> onnx.ModelProto:
        """The segment as a model: the kept tensors it reads are its inputs."""
        graph = helper.make_graph(
            [self.nodes[i] for i in order],
            self.model.graph.name or "segment",
            [self._value_info(t) for t in fed],
            [helper.make_empty_tensor_value_info(t) for t in keep],
            [self.initializers[t] for t in read if t in self.initializers and t not in self.cache],
        )
        part = helper.make_model(
            graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version
        )
        part.functions.extend(self.model.functions)
        return part

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        """A graph input's declaration; for a computed tensor, its type and the dims every batch shares."""
        if name in self.inputs:
            return self.inputs[name]
        arrays = self.cache[name][: self.batches]
        elem = helper.np_dtype_to_tensor_dtype(arrays[0].dtype)
        if len({a.ndim for a in arrays}) > 1:
            return helper.make_tensor_value_info(name, elem, None)
        # every batch, not the first and the last: batches of several image sizes may come in turn
        dims = [d[0] if len(set(d)) == 1 else None for d in zip(*(a.shape for a in arrays), strict=True)]
        return helper.make_tensor_value_info(name, elem, dims)
