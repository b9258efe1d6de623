"""one_blas_thread: numpy's OpenBLAS on one thread inside the block, the count restored after."""

from __future__ import annotations

import numpy as np
import pytest

from egp_onnx.threads import one_blas_thread, openblas_local


def test_one_thread_inside_the_block_and_the_count_restored_after():
    setter = openblas_local()
    if setter is None:
        pytest.skip("numpy is not linked against an OpenBLAS with per-thread counts")
    before = setter(2)  # a known count to restore to
    try:
        with one_blas_thread():
            assert setter(1) == 1  # the setter returns the count it replaces
            a = np.random.default_rng(0).normal(size=(64, 64))
            np.testing.assert_allclose(np.linalg.solve(a, a), np.eye(64), atol=1e-8)
        assert setter(2) == 2
    finally:
        setter(before)


def test_the_count_is_restored_when_the_block_raises():
    setter = openblas_local()
    if setter is None:
        pytest.skip("numpy is not linked against an OpenBLAS with per-thread counts")
    before = setter(2)
    try:
        with pytest.raises(ZeroDivisionError), one_blas_thread():
            1 / 0  # noqa: B018
        assert setter(2) == 2
    finally:
        setter(before)
