"""The refit's sums per part: the generator a cluster's parts draw from is the one process's."""

from __future__ import annotations

import numpy as np

from egp_onnx.reconstruct.parts import _skip


def test_skipping_a_parts_draws_leaves_the_generator_as_drawing_them_does():
    # A permutation's 32-bit draws leave half of a 64-bit draw for the next one; PCG64.advance
    # alone drops it, and the next layer's tie order would differ from one process's.
    drawn, skipped = np.random.default_rng(5), np.random.default_rng(5)
    for rng in (drawn, skipped):
        rng.permutation(10)
    assert drawn.bit_generator.state["has_uint32"] == 1
    drawn.random((3, 11))
    _skip(skipped, 33)
    assert drawn.bit_generator.state == skipped.bit_generator.state
    assert np.array_equal(drawn.permutation(50), skipped.permutation(50))
