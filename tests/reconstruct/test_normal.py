"""Streamed normal equations: the sums of every row's products, in any chunking."""

from __future__ import annotations

import numpy as np
import pytest
from models import f32

from egp_onnx.reconstruct import normal


@pytest.mark.parametrize(("chunk", "part_rows"), [(1, 512), (2**30, 512), (2**30, 1), (1, 1)])
def test_normal_equations_in_chunks_equal_the_products_of_all_rows(rng, monkeypatch, chunk, part_rows):
    # Rows are collected and multiplied in chunks (each batch alone, or all at once), each chunk
    # in parts when it has the rows: the sums are A~^T A~ and A~^T Y over every row, per group,
    # with the bias column.
    monkeypatch.setattr(normal, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(normal, "MIN_PART_ROWS", part_rows)
    batches = [(f32(rng.normal(size=(2, n, 5))), rng.normal(size=(n, 6))) for n in (7, 3, 9)]
    sums = normal.NormalEquations(2, 5, 6, bias=True)
    for rows, target in batches:
        sums.add(rows, target)
    sums.finish()
    rows = np.concatenate([r for r, _ in batches], axis=1).astype(np.float64)
    target = np.concatenate([t for _, t in batches])
    for g in range(2):
        a = np.concatenate([rows[g], np.ones((len(target), 1))], axis=1)
        np.testing.assert_allclose(sums.gram[g], a.T @ a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sums.cross[g], a.T @ target[:, 3 * g : 3 * g + 3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sums.target_sq, (target**2).sum(axis=0))
    assert sums.rows == 19
