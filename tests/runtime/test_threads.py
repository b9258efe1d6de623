"""one_blas_thread: numpy's OpenBLAS on one thread inside the block, the count restored after;
map_parts: results in order, the parts on several threads when there are cores for them."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest

from egp_onnx.runtime import threads
from egp_onnx.runtime.threads import map_parts, one_blas_thread, openblas_local


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


def _part(k: int) -> tuple[int, int]:
    time.sleep(0.01)  # long enough that a free worker takes the next part
    return k * k, threading.get_ident()


def test_parts_run_on_several_threads_and_come_back_in_order(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 2)
    results = map_parts(_part, range(6))
    assert [value for value, _ in results] == [k * k for k in range(6)]
    assert len({ident for _, ident in results}) == 2


def test_parts_run_in_the_calling_thread_on_one_core(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 1)
    results = map_parts(_part, range(4))
    assert [value for value, _ in results] == [0, 1, 4, 9]
    assert {ident for _, ident in results} == {threading.get_ident()}


def test_a_parts_error_reaches_the_caller(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 2)
    with pytest.raises(ZeroDivisionError):
        map_parts(lambda k: 1 / k, [1, 0])


def _parts_in_a_child(queue) -> None:
    queue.put(map_parts(abs, [-1, -2, -3]))


def test_parts_run_in_a_process_forked_after_the_pool_started(monkeypatch):
    # The pool's threads do not survive a fork: a child using the parent's pool would wait forever.
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(threads, "cores", lambda: 2)
    assert map_parts(abs, [-1, -2]) == [1, 2]  # the parent's pool now has threads
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_parts_in_a_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=30) == [1, 2, 3]
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
