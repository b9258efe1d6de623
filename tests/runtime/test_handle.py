"""ModelHandle and StoredOutputs (runtime/handle.py): one session per model, built once, let go when
stored outputs stand in for it; measured the same either way.
"""

from __future__ import annotations

import numpy as np
from models import inputs, single_conv

from egp_onnx.graph.weights import initializer_counts, split_weights
from egp_onnx.load.calibration import open_calibration
from egp_onnx.load.model import prepare_model
from egp_onnx.runtime.handle import ModelHandle, StoredOutputs
from egp_onnx.verify.fidelity import Reference, compare


def test_a_model_handle_builds_its_session_once_and_measures_the_same(rng, tmp_path):
    model = prepare_model(single_conv(rng))
    other = prepare_model(single_conv(np.random.default_rng(5)))
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=12))
    data = open_calibration(tmp_path / "c.npz", model)
    prepared = ModelHandle(other)
    session = prepared.session
    reference = Reference(model, data, 5)
    assert compare(model, prepared, data, 5) == compare(model, other, data, 5)
    assert reference.evaluate(prepared) == reference.evaluate(other)
    assert reference.evaluate(prepared).rel_error > 0
    assert prepared.session is session


def test_a_model_handle_with_known_or_split_weights_measures_and_counts_the_same(rng, tmp_path, monkeypatch):
    import egp_onnx.graph.weights as topology

    model = prepare_model(single_conv(rng))
    other = prepare_model(single_conv(np.random.default_rng(5)))
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=12))
    data = open_calibration(tmp_path / "c.npz", model)
    stubbed, weights = split_weights(other)
    plain, counts = compare(model, other, data, 5), initializer_counts(other)
    reference = ModelHandle(model)
    assert reference.session is not None  # built before to_array is watched
    read = []
    real = topology.numpy_helper.to_array
    monkeypatch.setattr(topology.numpy_helper, "to_array", lambda t, *a: read.append(t.name) or real(t, *a))
    for prepared in (ModelHandle(other, known=weights), ModelHandle(other, split=(stubbed, weights))):
        assert prepared.counts == {}
        assert compare(reference, prepared, data, 5) == plain
        assert prepared.counts == counts
    assert weights and not set(read) & set(weights), "the given arrays are not read again"
    assert plain.rel_error > 0 and counts["w"][1:] == (4 * 27, 4 * 27)


def test_stored_outputs_compare_as_the_model_does_and_its_session_goes(rng, tmp_path, monkeypatch):
    import egp_onnx.runtime.handle as handle

    model = prepare_model(single_conv(rng))
    other = prepare_model(single_conv(np.random.default_rng(5)))
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=12))
    data = open_calibration(tmp_path / "c.npz", model)
    plain = compare(model, other, data, 5, 1e-3, 1e-3)
    outputs = 12 * 4 * 6 * 6 * 4  # bytes: 12 samples of (4, 6, 6) float32
    monkeypatch.setattr(handle, "serialized_size", lambda m: outputs)  # weights as large as the outputs
    prepared = ModelHandle(model)
    session = prepared.session
    stored = StoredOutputs.instead_of(prepared, data, 5)
    assert isinstance(stored, StoredOutputs) and [len(b) for b in stored.batches] == [1, 1, 1]
    assert compare(stored, other, data, 5, 1e-3, 1e-3) == plain and plain.rel_error > 0
    assert prepared.warm == set() and prepared.session is not session, "let go, built again when run"
    assert compare(prepared, other, data, 5, 1e-3, 1e-3) == plain
    # outputs that would take more memory than the weights: the model keeps its session
    monkeypatch.setattr(handle, "serialized_size", lambda m: outputs - 1)
    session = prepared.session
    assert StoredOutputs.instead_of(prepared, data, 5) is prepared and prepared.session is session


def test_a_model_handle_remembers_the_shapes_it_has_run(rng, tmp_path):
    model = prepare_model(single_conv(rng))
    np.savez(tmp_path / "c.npz", x=inputs(rng, n=12))
    data = open_calibration(tmp_path / "c.npz", model)
    prepared = ModelHandle(model)
    Reference(prepared, data, 5)  # batches of 5, 5 and 2
    assert prepared.warm == {(("x", (5, 3, 6, 6)),), (("x", (2, 3, 6, 6)),)}


def test_a_model_handle_shrinks_its_arena_after_every_run(rng, monkeypatch):
    """The original's handle is kept to the end for the latency: its arena must not keep its largest batch."""
    import egp_onnx.runtime.handle as handle_module

    seen: list[bool] = []
    real = handle_module.run_session

    def recording(session, names, feed, shrink=False):
        seen.append(shrink)
        return real(session, names, feed, shrink)

    monkeypatch.setattr(handle_module, "run_session", recording)
    handle = ModelHandle(prepare_model(single_conv(rng)))
    handle.run(None, {"x": inputs(rng, 3)})
    assert seen == [True]
