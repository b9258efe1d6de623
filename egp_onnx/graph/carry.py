"""What a model carries besides its graph, carried over from the original to the model egp-onnx writes.

Downstream readers depend on it: RapidOCR reads its recogniser's alphabet from
``metadata_props["character"]`` and refuses a model without it. Graph surgery exports through
onnx-graphsurgeon, whose ``export_onnx`` builds a new ModelProto with none of ``doc_string``,
``domain``, ``model_version`` or ``metadata_props``; the fields are restored here, once, on the
model that is written.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx

log = logging.getLogger(__name__)

#: Model fields copied from the original as they are.
_KEPT_FIELDS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")


def carry_model_fields(original: onnx.ModelProto, result: onnx.ModelProto) -> onnx.ModelProto:
    """``result`` (modified in place and returned) with what ``original`` carries besides its graph.

    - producer, domain, model version and doc string: the original's;
    - ``metadata_props``: the original's entries, then any others the result has;
    - opset imports: every domain of either, at the higher version of the two (a rewrite may
      need a newer opset, never an older one); the IR version likewise;
    - model-local functions: the original's that the result lacks;
    - the graph's name and doc string, and its inputs and outputs in the original's order.

    ``original`` may be a weightless outline (:func:`egp_onnx.graph.weights.shape_skeleton`): only
    fields outside the initializers are read.
    """
    for name in _KEPT_FIELDS:
        setattr(result, name, getattr(original, name))
    theirs = {p.key: p.value for p in result.metadata_props}
    mine = {p.key: p.value for p in original.metadata_props}
    del result.metadata_props[:]
    for key, value in {**mine, **{k: v for k, v in theirs.items() if k not in mine}}.items():
        result.metadata_props.add(key=key, value=value)
    versions = {o.domain: o.version for o in original.opset_import}
    for o in result.opset_import:
        versions[o.domain] = max(versions.get(o.domain, 0), o.version)
    del result.opset_import[:]
    for domain, version in versions.items():
        result.opset_import.add(domain=domain, version=version)
    result.ir_version = max(result.ir_version, original.ir_version)
    present = {(f.domain, f.name) for f in result.functions}
    result.functions.extend(f for f in original.functions if (f.domain, f.name) not in present)
    result.graph.name = original.graph.name
    result.graph.doc_string = original.graph.doc_string
    _reorder(result.graph.input, [v.name for v in original.graph.input], "inputs")
    _reorder(result.graph.output, [v.name for v in original.graph.output], "outputs")
    return result


def _reorder(values: Any, order: list[str], what: str) -> None:
    """Put the graph's inputs or outputs in the original's order (inputs the result dropped stay dropped).

    Inputs may be fewer than the original's (initializers listed as inputs are taken out at load
    time); a name the original does not have is a bug upstream, and the order is then left alone.
    """
    rank = {name: i for i, name in enumerate(order)}
    if any(v.name not in rank for v in values):
        log.warning("the written model's graph %s are not the original's; their order is left as it is", what)
        return
    ordered = sorted(values, key=lambda v: rank[v.name])
    if [v.name for v in ordered] != [v.name for v in values]:
        copies = [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in ordered]
        del values[:]
        values.extend(copies)
