"""The masked ridge solver, against each output's own system solved by numpy."""

from __future__ import annotations

import numpy as np
import pytest

from egp_onnx.reconstruct import solve


@pytest.mark.parametrize("inverse", [False, True])
def test_masked_solves_equal_each_outputs_own_system(rng, inverse):
    # Outputs with supports of many sizes (one empty, one full) are solved in batches of similar
    # size, each batch in parts: every output's solution is its own ridge system's, 0 off its
    # support, and the inverses' diagonals are those of its own system.
    d, outputs = 12, 9
    a = rng.normal(size=(40, d))
    a[:, -1] = 1.0  # the bias column
    gram, cross = a.T @ a, a.T @ rng.normal(size=(40, outputs))
    support = rng.random((d - 1, outputs)) < np.linspace(0, 1, outputs)
    support[:, 0], support[:, -1] = False, True
    solution, diag = solve.solve_masked(gram, cross, support, bias=True, inverse=inverse)
    lam = solve.ridge(gram, bias=True)
    for j in range(outputs):
        kept = np.flatnonzero(np.append(support[:, j], True))
        system = gram[np.ix_(kept, kept)] + np.diag(np.where(kept < d - 1, lam, 0.0))
        expected = np.zeros(d)
        expected[kept] = np.linalg.solve(system, cross[kept, j])
        np.testing.assert_allclose(solution[:, j], expected, rtol=1e-9, atol=1e-12)
        if inverse:
            assert diag is not None
            np.testing.assert_allclose(diag[kept, j], np.diag(np.linalg.inv(system)), rtol=1e-9)
    assert (diag is None) == (not inverse)
