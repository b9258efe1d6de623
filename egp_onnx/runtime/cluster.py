"""Passes over the calibration data on a Dask distributed cluster: the only importer of Dask.

A pass (the statistics of one model version) becomes one task per part of the data. Each task
returns partial sums only; :meth:`Cluster.map` hands them back in the parts' order, whatever order
the workers finish in, so the caller merges them exactly as a single process would. A worker that
dies mid-pass has its tasks rerun by the scheduler (Dask's own rescheduling); a task's result is
read once from its future, so no part is merged twice.

State that must stay on one worker from one request to the next (the refit's activations) lives
in a :class:`Resident`, a Dask actor placed on a worker (:meth:`Cluster.place`) and called there
directly (:meth:`Cluster.ask`): a few milliseconds a round trip, where a task through the
scheduler takes 10-20 under load. A lost worker loses its residents: ``ask`` says so (None), and
their owner places new ones.

What moves per pass: the model once per worker (:meth:`Cluster.share`, broadcast) and the sums
back, both independent of the number of samples. The data's shard loaders are shared once per run:
a loader that reads a path needs that path on every worker (a shared file system), an in-memory
shard (a held-out split, a reader's feeds) goes to each worker that runs one of its parts, once.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from egp_onnx.errors import ConfigError, one_line
from egp_onnx.runtime.threads import cores

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: The one-line answer when the optional dependency is missing.
INSTALL_HINT = "--scheduler needs Dask distributed: pip install 'egp-onnx[dask]'"
#: Seconds the client waits for a scheduler before giving up (before any work starts).
CONNECT_TIMEOUT = 10
#: Model versions whose sessions a worker keeps (the loop's candidate and the one before).
CACHED_VERSIONS = 2

#: What a local worker runs, imported before it starts (see _forked).
WORKER_MODULES = ("egp_onnx.calibrate.collect", "egp_onnx.reconstruct.parts", "egp_onnx.verify.guard")

_LOCAL = re.compile(r"local:(\d+)")

#: Worker-side objects built once per model version (see :func:`worker_cached`).
_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()


def local_workers(spec: str) -> int | None:
    """N for ``local:N``, None for a scheduler address.

    Raises:
        ConfigError: ``local:`` without a positive count, or an empty address.

    """
    if not spec.strip():
        raise ConfigError("--scheduler needs an address (tcp://host:8786) or local:N")
    if not spec.startswith("local:"):
        return None
    found = _LOCAL.fullmatch(spec)
    if found is None or int(found.group(1)) < 1:
        raise ConfigError(f"--scheduler {spec}: local:N takes a worker count N >= 1, e.g. local:2")
    return int(found.group(1))


class Resident:
    """An object kept on one worker (see :meth:`Cluster.place`), its methods called by :meth:`Cluster.ask`.

    :meth:`answer` hands back what a method raises as a value, so that an exception out of the
    call itself can only mean that the worker was lost.
    """

    def answer(self, method: str, *args: Any) -> tuple[bool, Any]:
        """(True, ``self.method(*args)``), or (False, the exception it raised)."""
        try:
            return True, getattr(self, method)(*args)
        except Exception as exc:  # raised again on the client, as it is
            return False, exc


class Placed:
    """A handle of an object kept on a worker (:meth:`Cluster.place`): its future, then the object's proxy."""

    def __init__(self, future: Any) -> None:
        self.future = future
        self.actor: Any = None  # the Dask actor, once built
        self.answered = False  # whether a call has been answered (the first may open the object)


async def _lost(exc: BaseException) -> BaseException:
    """An awaitable of a call that could not be sent (its worker is gone): OSError, as a lost answer."""
    return exc if isinstance(exc, OSError) else OSError(str(exc))


class Cluster:
    """A connected Dask client: shares objects with the workers and maps tasks over them."""

    def __init__(self, client: Any, threads: int, in_loop: bool = False) -> None:
        self.client = client
        #: onnxruntime threads per task: a local cluster's workers share this machine's cores;
        #: a remote worker uses its own machine's (0: onnxruntime's default, one per core).
        self.threads = threads
        #: Whether a resident's methods run on its worker's event loop (see :meth:`ask`).
        self.in_loop = in_loop
        self._shared: dict[int, tuple[Any, Any]] = {}
        self._model: tuple[Any, str, Any] | None = None  # the last model shared (share_model)

    @property
    def workers(self) -> int:
        """Workers connected now."""
        # nthreads() lists every worker in every Dask since 2024.1 (scheduler_info truncates to 5)
        return len(self.client.nthreads())

    def share(
        self, value: Any, broadcast: bool = True, workers: Sequence[str] | None = None
    ) -> tuple[str, Any]:
        """``value`` placed on the workers: (a key naming this version, its future).

        ``workers``: on those only (a task elsewhere fetches it from one of them). Tasks given
        the future receive the value itself; a task may build objects from it once per key with
        :func:`worker_cached`.
        """
        where = list(workers) if workers is not None else None
        (future,) = self.client.scatter([value], broadcast=broadcast, hash=False, workers=where, direct=False)
        return uuid.uuid4().hex, future

    @property
    def addresses(self) -> list[str]:
        """The connected workers' addresses, sorted (tasks are pinned to them by position)."""
        return sorted(self.client.nthreads())

    def share_model(self, model: Any) -> tuple[str, Any]:
        """A model's serialised bytes on every worker: (its version key, the bytes' future).

        The same model object as the last call's is not shipped again: a loop step's candidate
        goes to the workers once for its guard measurement and its statistics pass.
        """
        last = self._model
        if last is None or last[0] is not model:
            key, future = self.share(model.SerializeToString())
            last = self._model = (model, key, future)
        return last[1], last[2]

    def share_once_model(self, model: Any) -> Any:
        """A model's serialised bytes on every worker once for this run (the same model: the same future)."""
        return self._scatter_once(model, model.SerializeToString)

    def share_once(self, value: Any) -> Any:
        """``value`` placed on every worker once for this run (the same object: the same future).

        On every worker, not one: scattered data cannot be recomputed, so a copy held by a single
        worker would be lost with it, and with it every task that reads it.
        """
        return self._scatter_once(value, lambda: value)

    def _scatter_once(self, owner: Any, payload: Callable[[], Any]) -> Any:
        """``payload()`` broadcast to every worker once per ``owner`` (the same object: the same future)."""
        held = self._shared.get(id(owner))
        if held is None or held[0] is not owner:
            # through the scheduler (direct=False), where replicas are placed as it records them
            (future,) = self.client.scatter([payload()], broadcast=True, hash=False, direct=False)
            held = self._shared[id(owner)] = (owner, future)
        return held[1]

    def map(
        self,
        function: Callable[..., R],
        items: Sequence[tuple[Any, ...]],
        on_done: Callable[[int, R], None] | None = None,
    ) -> list[R]:
        """``[function(*item) for item in items]`` on the workers, in the order of ``items``.

        ``on_done(index, result)`` is called as each task finishes (progress), in finishing order.
        An error a task raises is raised here, as it is (an EgpError stays one).
        """
        from distributed import as_completed

        futures = [self.client.submit(function, *item, pure=False) for item in items]
        where = {future.key: i for i, future in enumerate(futures)}
        results: list[Any] = [None] * len(items)
        try:
            for future in as_completed(futures):
                i = where[future.key]
                results[i] = future.result()  # raises the task's own exception
                if on_done is not None:
                    on_done(i, results[i])
        except BaseException:
            self.client.cancel([f for f in futures if not f.done()])  # the rest is not wanted
            raise
        return results

    def place(self, kind: type[Resident], args: tuple[Any, ...], worker: str | None) -> Placed:
        """A ``kind(*args)`` built and kept on ``worker`` (None: any; elsewhere if it is gone).

        Returns its handle for :meth:`ask`; the object lives as long as the handle. Futures among
        ``args`` arrive as their values.
        """
        if worker is None:
            return Placed(self.client.submit(kind, *args, actor=True, pure=False))
        where = {"workers": [worker], "allow_other_workers": True}
        return Placed(self.client.submit(kind, *args, actor=True, pure=False, **where))

    def ask(self, calls: Sequence[tuple[Placed, str, tuple[Any, ...]]]) -> list[Any]:
        """``[handle.method(*args) for handle, method, args in calls]``, all at once, in that order.

        Each call goes to its object's worker directly (no task: a round trip of a few
        milliseconds where a task takes 10-20 under load), and the client waits for all of them
        at once; an object runs one call at a time. None for a call whose worker was lost, and
        its object with it (place another). An error a method raises is raised here, as it is.

        With :attr:`in_loop` (local worker processes), a call runs on its worker's event loop
        rather than being handed to the worker's actor thread and its answer handed back: with
        the cores busy, each hand-off waits for the thread to be scheduled. A worker runs one
        call at a time either way, and its loop has nothing else to do meanwhile. An object's
        first call still runs on the thread: it may open the object (load its data, replay
        earlier requests), long enough for the worker's heartbeats to need the loop.
        """
        import asyncio

        async def answers() -> list[Any]:
            pending = []
            for handle, method, args in calls:
                where = {"separate_thread": False} if self.in_loop and handle.answered else {}
                try:
                    if handle.actor is None:
                        handle.actor = await handle.future
                    pending.append(handle.actor.answer(method, *args, **where))
                except (OSError, RuntimeError) as exc:  # Dask: "Worker holding Actor was lost"
                    pending.append(_lost(exc))
            return await asyncio.gather(*pending, return_exceptions=True)

        results: list[Any] = []
        for (handle, _, _), answer in zip(calls, self.client.sync(answers), strict=True):
            if isinstance(answer, OSError):  # the worker did not answer: lost
                results.append(None)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                handle.answered = True
                done, value = answer
                if not done:
                    raise value  # the exception the method raised
                results.append(value)
        return results

    def close(self) -> None:
        """Disconnect (and stop a local cluster this client started)."""
        cluster = getattr(self.client, "cluster", None)
        self.client.close()
        if cluster is not None:
            cluster.close()


@contextmanager
def open_cluster(spec: str, processes: bool = True) -> Iterator[Cluster]:
    """Connect to the scheduler at ``spec``, or start ``local:N`` workers; disconnect on exit.

    ``processes=False`` runs a local cluster's workers as threads of this process (tests).

    Raises:
        ConfigError: Dask is not installed, ``spec`` is malformed, or no scheduler answers there
            (before any work starts).

    """
    count = local_workers(spec)
    try:
        import dask
        import distributed
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    # Dask logs every scheduler event at INFO; ours speak at warning and above (errors only when
    # egp_onnx's own logger is quieter), for as long as the cluster lives.
    dask_log = logging.getLogger("distributed")
    previous = dask_log.level
    dask_log.setLevel(max(logging.WARNING, logging.getLogger("egp_onnx").getEffectiveLevel()))
    try:
        with _connected(spec, count, processes, dask, distributed) as cluster:
            yield cluster
    finally:
        dask_log.setLevel(previous)


@contextmanager
def _connected(
    spec: str, count: int | None, processes: bool, dask: Any, distributed: Any
) -> Iterator[Cluster]:
    """The client of :func:`open_cluster`, closed on exit."""
    if count is not None:
        # Dask's nanny sets its workers' environment (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_,
        # ...) in this process's os.environ before it spawns them, and leaves it there: a library
        # must not change its caller's environment (a later torch, a subprocess would inherit it).
        # Not asked for, and what was there is put back.
        environ = dict(os.environ)
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {}, **_forked(dask, distributed)}):
            local = _local_cluster(distributed, count, processes)
        os.environ.clear()
        os.environ.update(environ)
        # The workers are on this machine: the client talks to them directly (a resident's
        # answers do not pass through the scheduler's process on their way).
        client = distributed.Client(local, direct_to_workers=True)
        threads = max(1, cores() // count)
        in_loop = processes  # thread workers share this process's event loop: one at a time on it
    else:
        try:
            client = distributed.Client(spec, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"--scheduler {spec}: no Dask scheduler reachable ({one_line(exc)})") from exc
        threads, in_loop = 0, False  # a remote worker's long calls would stall its heartbeats
    cluster = Cluster(client, threads, in_loop)
    try:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
        except TimeoutError as exc:
            raise ConfigError(f"--scheduler {spec}: the scheduler has no workers") from exc
        yield cluster
    finally:
        cluster.close()


def _forked(dask: Any, distributed: Any) -> dict[str, str]:
    """Dask's setting for local worker processes forked from one that imported :data:`WORKER_MODULES`.

    Spawned, each worker imports them itself before its first task (onnx, onnxruntime, numpy:
    about a second of a core each, several under load); a fork server imports them once and
    every worker starts with them. Where there is no fork server (Windows): spawned, as Dask does.
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return {}
    method = {"distributed.worker.multiprocessing-method": "forkserver"}
    with dask.config.set(method):
        distributed.utils.get_mp_context()  # Dask sets its own list once: ours after it
    multiprocessing.get_context("forkserver").set_forkserver_preload(["distributed", *WORKER_MODULES])
    return method


def _local_cluster(distributed: Any, count: int, processes: bool) -> Any:
    """``count`` workers on 127.0.0.1, one task at a time each (its session has the cores).

    Worker processes get this process's environment as it is now, as spawned ones would: a fork
    server's children otherwise may have the one it had when it started (the first cluster's; the
    two killed-worker tests in one session see the second's marker only with it).
    """
    environment = {"env": dict(os.environ)} if processes else {}  # thread workers: this process's
    return distributed.LocalCluster(
        n_workers=count,
        threads_per_worker=1,
        processes=processes,
        host="127.0.0.1",
        protocol="tcp://",  # also for thread workers: the same transport as real ones
        dashboard_address=":0",  # a free port: its HTTP server never collides with another cluster's
        silence_logs=logging.ERROR,
        **environment,
    )


def worker_cached(key: str, build: Callable[[], T]) -> T:
    """The object built for ``key`` in this worker process (built on first use).

    Only the last :data:`CACHED_VERSIONS` keys are kept: a worker holds the sessions of the
    model versions of the current step, not of every step.
    """
    with _CACHE_LOCK:  # workers of a thread-based local cluster share the process
        if key not in _CACHE:
            while len(_CACHE) >= CACHED_VERSIONS:
                del _CACHE[next(iter(_CACHE))]
            _CACHE[key] = build()
        return _CACHE[key]


@contextmanager
def cluster_or_none(spec: str | None) -> Iterator[Cluster | None]:
    """:func:`open_cluster` for a ``spec``; None (this process) without one."""
    if spec is None:
        yield None
        return
    with open_cluster(spec) as cluster:
        yield cluster
