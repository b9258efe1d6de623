"""Streamed normal equations: the sums of every row's products, in any chunking and over samples of
several sizes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from models import Builder, f32
from references import run_ort

from egp_onnx.graph.layers import linear_layers
from egp_onnx.graph.weights import split_weights
from egp_onnx.reconstruct import normal
from egp_onnx.reconstruct.im2col import positions_per_sample
from egp_onnx.runtime.segments import Activations


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


def test_pickled_equations_are_the_same_bits_in_half_the_bytes_of_a_symmetric_gram(rng):
    # What a cluster worker sends back: the Gram matrices' upper triangles, mirrored on arrival.
    sums = normal.NormalEquations(2, 40, 6, bias=True)
    sums.add(f32(rng.normal(size=(2, 50, 40))), rng.normal(size=(50, 6)))
    sums.finish()
    full = len(pickle.dumps(sums.__dict__))
    assert np.array_equal(sums.gram, sums.gram.transpose(0, 2, 1))  # grouped products too
    for gram in (
        sums.gram,
        sums.gram + np.triu(np.full(sums.gram.shape[1:], 1e-9), 1),
    ):  # the second not symmetric
        sums.gram = gram
        back = pickle.loads(pickle.dumps(sums))
        for name in ("gram", "cross", "target_sq"):
            assert np.array_equal(getattr(back, name), getattr(sums, name)), name
        assert (back.rows, back.bias) == (sums.rows, sums.bias)
        symmetric = np.array_equal(gram, gram.transpose(0, 2, 1))
        assert len(pickle.dumps(sums)) < 0.6 * full if symmetric else len(pickle.dumps(sums)) >= full


def test_samples_of_several_sizes_get_positions_in_proportion_to_their_area():
    assert positions_per_sample([(7, 81), (5, 81)], 8) == {81: 8}, "one size: take, as before"
    assert positions_per_sample([(10, 16), (10, 64)], 8) == {16: 3, 64: 13}  # 3.2 and 12.8
    # 30 small and 10 large samples: 30 x 18 + 10 x 73 = 1270 rows, about 40 x 32 = 1280
    assert positions_per_sample([(30, 100), (10, 400)], 32) == {100: 18, 400: 73}
    assert positions_per_sample([(1, 4), (100, 400)], 64) == {4: 1, 400: 65}, "at least one each"
    assert positions_per_sample([(4, 9), (4, 16)], 20) == {9: 9, 16: 16}, "never more than there are"


def test_normal_equations_over_batches_of_several_sizes_sum_every_position(rng):
    """
    x(N,3,H,W) -> Conv3x3(3->4, pad 1, bias) "conv" -> y

    Batches of 4x5 and 6x6 images, few enough samples that every output position is taken: the
    sums are those of an im2col written out here, over every position of every sample.
    """
    b = Builder(rng)
    model = b.model(b.conv("x", "conv", 3, 4, 3, pad=1), ("N", 3, "H", "W"))
    (layer,), _ = linear_layers(model)
    batches = [{"x": f32(rng.normal(size=(n, 3, h, w)))} for n, h, w in ((5, 4, 5), (3, 6, 6), (5, 4, 5))]
    now = Activations(*split_weights(model), batches, 2**30)
    then = Activations(*split_weights(model), batches, 2**30)
    sums = normal.normal_equations(layer, 28, now, then, [], np.random.default_rng(0))
    rows, targets = [], []
    for feed in batches:
        x = feed["x"].astype(np.float64)
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        n, _, h, w = x.shape
        (y,) = run_ort(model, feed)
        for s in range(n):
            for i in range(h):
                for j in range(w):
                    rows.append([*padded[s, :, i : i + 3, j : j + 3].ravel(), 1.0])  # (c, kh, kw), 1
                    targets.append(y[s, :, i, j])
    a, t = np.array(rows), np.array(targets, dtype=np.float64)
    assert sums.rows == len(a) == 5 * 20 + 3 * 36 + 5 * 20
    np.testing.assert_allclose(sums.gram[0], a.T @ a, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sums.cross[0], a.T @ t, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sums.target_sq, (t**2).sum(axis=0), rtol=1e-5)


def test_a_groups_rows_are_gathered_in_slices_of_at_most_a_chunk_with_the_same_sums(rng, monkeypatch):
    # A few large samples take many positions each: their im2col rows are gathered a slice of
    # CHUNK_BYTES at a time (here 10 rows of 27 float32 columns), and the sums do not change.
    b = Builder(rng)
    model = b.model(b.conv("x", "conv", 3, 4, 3, pad=1), ("N", 3, "H", "W"))
    (layer,), _ = linear_layers(model)
    batches = [{"x": f32(rng.normal(size=(3, 3, 6, 7)))}]

    def sums() -> normal.NormalEquations:
        now = Activations(*split_weights(model), batches, 2**30)
        then = Activations(*split_weights(model), batches, 2**30)
        return normal.normal_equations(layer, 28, now, then, [], np.random.default_rng(0))

    whole = sums()
    gathered: list[int] = []
    group_rows = normal._group_rows

    def counted(layer, item):
        rows, y = group_rows(layer, item)
        gathered.append(rows.shape[1])
        return rows, y

    monkeypatch.setattr(normal, "_group_rows", counted)
    monkeypatch.setattr(normal, "CHUNK_BYTES", 10 * 27 * 4)
    sliced = sums()
    assert sliced.rows == whole.rows == 3 * 42 and max(gathered) == 10 and sum(gathered) == 126
    np.testing.assert_allclose(sliced.gram, whole.gram, rtol=1e-5, atol=1e-5)  # float32 products
    np.testing.assert_allclose(sliced.cross, whole.cross, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5, 7, 8])
def test_blocks_of_parts_summed_apart_give_the_bits_of_all_parts_summed_together(rng, parts):
    # A cluster worker adds its block of parts' sums and sends one; the client adds the blocks.
    # Float sums are not associative: only a fixed tree whose nodes the blocks are gives the
    # same bits for every number of workers.
    def one(seed):
        local = np.random.default_rng(seed)
        sums = normal.NormalEquations(1, 6, 3, bias=True)
        scale = 10.0 ** local.integers(-3, 4)  # magnitudes far apart: the order of the additions shows
        sums.add(f32(local.normal(size=(1, 40, 6)) * scale), local.normal(size=(40, 3)))
        sums.finish()
        return sums

    seeds = rng.integers(0, 2**31, parts)
    leaves = lambda: {(p, p + 1): one(s) for p, s in enumerate(seeds)}  # noqa: E731
    whole = normal.tree_sum(0, parts, leaves())
    for count in range(1, parts + 2):
        blocks = normal.sum_blocks(parts, count)
        assert len(blocks) == min(count, parts)
        assert [lo for lo, _ in blocks] == sorted(lo for lo, _ in blocks) and blocks[0][0] == 0
        assert all(a[1] == b[0] for a, b in zip(blocks[:-1], blocks[1:], strict=True))
        assert blocks[-1][1] == parts
        sizes = [hi - lo for lo, hi in blocks]
        assert max(sizes) <= 2 * min(sizes)
        known = {}
        for lo, hi in blocks:  # each block summed alone, as its worker does
            mine = {k: v for k, v in leaves().items() if lo <= k[0] < hi}
            known[lo, hi] = normal.tree_sum(lo, hi, mine)
        total = normal.tree_sum(0, parts, known)
        for name in ("gram", "cross", "target_sq"):
            assert np.array_equal(getattr(total, name), getattr(whole, name)), (count, name)
        assert total.rows == whole.rows == 40 * parts
