"""Passes over the calibration data on a Dask distributed cluster: the only importer of Dask.

Every pass talks to objects kept on the workers (:class:`Resident`, Dask actors placed by
:meth:`Cluster.place`) with direct calls (:meth:`Cluster.ask`): a few milliseconds a round trip,
where a task through the scheduler takes 10-20 under load. A pass whose parts need no state from
one call to the next (a statistics pass, a guard measurement) sends each part to its worker's
runner (:meth:`Cluster.run_parts`) and gets the partial sums back in the parts' order, whatever
order they finish in, so the caller merges them as a single process would. The refit keeps its
parts' activations on their workers in residents of its own (egp_onnx.reconstruct.parts).

A lost worker loses its residents and their calls are answered None; :meth:`Cluster.ask_all`
is the one place that places them again elsewhere and sends their calls again, for every pass.
A call answered is never sent again, so no part is merged twice.

What moves per pass: the model once per worker (a :class:`Kept` argument: each resident gets it
once, the bytes pickled once for all), each call's own arguments (pickled once for every worker
when they are the same, :class:`Payload`) and the sums back, all independent of the number of
samples. The data's shard loaders go to each worker once per run: a loader that reads a path
needs that path on every worker (a shared file system), an in-memory shard (a held-out split, a
reader's feeds) goes in the loaders themselves.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
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
#: Times a pass's calls are sent again to objects whose worker was lost, before giving up.
RETRIES = 3

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
        """(True, ``self.method(*args)``), or (False, the exception it raised).

        A :class:`Payload` argument arrives as its value; a :class:`Kept` one as its value,
        kept here for the later calls that name it without it.
        """
        try:
            values = [self._unpacked(arg) for arg in args]
            return True, getattr(self, method)(*values)
        except Exception as exc:  # raised again on the client, as it is
            return False, exc

    def _unpacked(self, arg: Any) -> Any:
        if isinstance(arg, Payload):
            return arg.value()
        if not isinstance(arg, Kept):
            return arg
        kept: dict[str, dict[str, Any]] = self.__dict__.setdefault("_kept", {})
        slot = kept.setdefault(arg.slot, {})
        if arg.pickled is not None:
            _remember(slot, arg.key, pickle.loads(arg.pickled))
        return slot[arg.key]  # a KeyError here: the client's record of what is kept here is wrong


def _remember(slot: dict[str, Any], key: str, value: Any) -> None:
    """``slot[key] = value``, the slot holding the last :data:`CACHED_VERSIONS` keys only.

    The client keeps the same record of each resident's slots (:meth:`Placed.keeps`), by the same rule.
    """
    slot.pop(key, None)
    while len(slot) >= CACHED_VERSIONS:
        del slot[next(iter(slot))]
    slot[key] = value


class Payload:
    """A call's argument pickled once, however many residents it is sent to (a layer's request)."""

    def __init__(self, value: Any) -> None:
        self.pickled = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def value(self) -> Any:
        """The value, unpickled (on the resident)."""
        return pickle.loads(self.pickled)


class Kept:
    """A call's argument that a resident keeps once it has it: sent to each resident once.

    ``slot`` names what it is (the model, the data's loaders); a resident keeps the last
    :data:`CACHED_VERSIONS` keys of each slot (a loop step's candidate and the one before). The
    value is pickled once here, for every resident that gets it.
    """

    def __init__(self, slot: str, key: str, value: Any) -> None:
        self.slot, self.key = slot, key
        self.pickled: bytes | None = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def named(self) -> Kept:
        """The argument without its value: for a resident that keeps it already."""
        empty = Kept.__new__(Kept)
        empty.slot, empty.key, empty.pickled = self.slot, self.key, None
        return empty


class Placed:
    """A handle of an object kept on a worker (:meth:`Cluster.place`): its future, then the object's proxy."""

    def __init__(self, future: Any, in_loop: bool = True) -> None:
        self.future = future
        self.actor: Any = None  # the Dask actor, once built
        self.answered = False  # whether a call has been answered (the first may open the object)
        self.in_loop = in_loop  # its later calls may run on the worker's event loop (Cluster.ask)
        self.kept: dict[str, dict[str, None]] = {}  # per slot, the Kept keys sent to it (as it keeps them)

    def keeps(self, arg: Kept) -> bool:
        """Whether the object keeps ``arg`` already (else it is sent with its value, and recorded)."""
        slot = self.kept.setdefault(arg.slot, {})
        if arg.key in slot:
            return True
        _remember(slot, arg.key, None)
        return False


def _sent(handle: Placed, arg: Any) -> Any:
    """``arg`` as it is sent to ``handle``'s object: a :class:`Kept` it keeps already, without its value."""
    if isinstance(arg, Kept) and handle.keeps(arg):
        return arg.named()
    return arg


class _Runner(Resident):
    """A worker's runner of parts of a pass (:meth:`Cluster.run_parts`): holds what it was sent to keep."""

    def run(self, function: Callable[..., Any], count: int, *args: Any) -> Any:
        """``function(*kept, *shared, *item)``: ``count`` kept values, the shared tuple, the item."""
        kept, shared, item = args[:count], args[count], args[count + 1 :]
        return function(*kept, *shared, *item)


class Cluster:
    """A connected Dask client: places objects on the workers and sends them calls."""

    def __init__(self, client: Any, threads: int, in_loop: bool = False) -> None:
        """``client``: a connected Dask client, or a future of one (a cluster still starting)."""
        self._client = None if isinstance(client, Future) else client
        self._starting: Future[Any] | None = client if isinstance(client, Future) else None
        #: onnxruntime threads per part: a local cluster's workers share this machine's cores;
        #: a remote worker uses its own machine's (0: onnxruntime's default, one per core).
        self.threads = threads
        #: Whether a resident's methods run on its worker's event loop (see :meth:`ask`).
        self.in_loop = in_loop
        self._kept: dict[int, tuple[Any, Kept]] = {}  # kept_once's arguments, by their value's id
        self._model: tuple[Any, Kept] | None = None  # the last model sent (kept_model)
        self._runners: list[Placed] = []  # one per worker (run_parts), placed at first use
        self._runner_workers: set[str] = set()  # the workers runners were placed on
        self._ahead: dict[bytes, Placed] = {}  # place_ahead's objects for its next calls, by their arguments

    @property
    def client(self) -> Any:
        """The Dask client; waits for a cluster still starting (its error is raised here)."""
        if self._client is None:
            assert self._starting is not None
            self._client = self._starting.result()
        return self._client

    @property
    def ready(self) -> bool:
        """Whether the workers are up: work that needs them now does not wait for them."""
        starting = self._starting
        return self._client is not None or (
            starting is not None and starting.done() and starting.exception() is None
        )

    @property
    def workers(self) -> int:
        """Workers connected now."""
        # nthreads() lists every worker in every Dask since 2024.1 (scheduler_info truncates to 5)
        return len(self.client.nthreads())

    @property
    def addresses(self) -> list[str]:
        """The connected workers' addresses, sorted (tasks are pinned to them by position)."""
        return sorted(self.client.nthreads())

    def kept_model(self, model: Any) -> Kept:
        """A model's serialised bytes as a :class:`Kept` argument: each runner gets them once.

        The same model object as the last call's is the same argument: a loop step's candidate
        goes to each worker once, for its guard measurement and its statistics pass.
        """
        last = self._model
        if last is None or last[0] is not model:
            last = self._model = (model, Kept("model", uuid.uuid4().hex, model.SerializeToString()))
        return last[1]

    def kept_once(self, slot: str, value: Any, payload: Callable[[], Any] | None = None) -> Kept:
        """``value`` (or what ``payload()`` makes of it) as a :class:`Kept` argument for this run.

        The same object: the same argument, pickled once per run.
        """
        held = self._kept.get(id(value))
        if held is None or held[0] is not value:
            kept = Kept(slot, uuid.uuid4().hex, value if payload is None else payload())
            held = self._kept[id(value)] = (value, kept)
        return held[1]

    def run_parts(
        self,
        function: Callable[..., R],
        kept: Sequence[Kept],
        shared: tuple[Any, ...],
        items: Sequence[tuple[Any, ...]],
        on_done: Callable[[int, R], None] | None = None,
        what: str = "pass",
    ) -> list[R]:
        """``[function(*kept, *shared, *item) for item in items]`` on the workers, in the order of ``items``.

        Each worker has a runner (a :class:`Resident` placed at its first pass, kept for the run,
        a worker that joins later gets one at the next pass);
        item i goes to runner i mod n as a direct call, no task through the scheduler. ``kept``
        (the model, the data's loaders) go to each runner once (:class:`Kept`), ``shared`` is
        pickled once for all calls. A lost worker's items run again on a runner placed elsewhere
        (:meth:`ask_all`): each item's result is read once. ``on_done(index, result)`` as each
        item is answered (progress). An error ``function`` raises is raised here, as it is.
        """
        for address in self.addresses:
            if address not in self._runner_workers:
                self._runner_workers.add(address)
                self._runners.append(self.place(_Runner, (), address, in_loop=False))
        runners = self._runners
        where = [i % len(runners) for i in range(len(items))]
        payload = Payload(shared)

        def call(i: int) -> tuple[Placed, str, tuple[Any, ...]]:
            return runners[where[i]], "run", (function, len(kept), *kept, payload, *items[i])

        def replace(lost: Sequence[int]) -> None:
            for r in sorted({where[i] for i in lost}):
                runners[r] = self.place(_Runner, (), None, in_loop=False)

        return self.ask_all(len(items), call, replace, what, on_done)

    def ask_all(
        self,
        count: int,
        call: Callable[[int], tuple[Placed, str, tuple[Any, ...]]],
        replace: Callable[[Sequence[int]], None],
        what: str,
        on_answer: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """Per unit ``u < count``, the answer of the call ``call(u)``, all sent at once (:meth:`ask`).

        The one place where a lost worker's work is done again, for every pass (the statistics,
        the guard, the refit): the units whose worker was lost go to ``replace`` (which places
        their objects again, elsewhere) and are asked again, at most :data:`RETRIES` times. A
        unit answered is never asked again, so no answer is read, or merged, twice.

        Raises:
            ConfigError: units lost their workers :data:`RETRIES` times in turn.

        """
        answers: list[Any] = [None] * count
        todo = list(range(count))
        for attempt in range(RETRIES + 1):
            calls = [call(u) for u in todo]

            def answered(i: int, value: Any, todo: list[int] = todo) -> None:
                if on_answer is not None:
                    on_answer(todo[i], value)

            for u, answer in zip(todo, self.ask(calls, answered), strict=True):
                answers[u] = answer
            todo = [u for u in todo if answers[u] is None]
            if not todo:
                return answers
            if attempt == RETRIES:
                break
            log.warning("%s: %d of %d calls lost their worker; sending them again", what, len(todo), count)
            replace(todo)
        raise ConfigError(f"{what}: {len(todo)} parts lost {RETRIES} workers in turn")

    def place(
        self, kind: type[Resident], args: tuple[Any, ...], worker: str | None, in_loop: bool = True
    ) -> Placed:
        """A ``kind(*args)`` built and kept on ``worker`` (None: any; elsewhere if it is gone).

        Returns its handle for :meth:`ask`; the object lives as long as the handle. Futures among
        ``args`` arrive as their values. ``in_loop``: its calls may run on the worker's event loop
        (:meth:`ask`); False for calls that may be long (a part of a pass).
        """
        if worker is None:
            return Placed(self.client.submit(kind, *args, actor=True, pure=False), in_loop)
        where = {"workers": [worker], "allow_other_workers": True}
        return Placed(self.client.submit(kind, *args, actor=True, pure=False, **where), in_loop)

    def place_ahead(self, kind: type[Resident], args: tuple[Any, ...], worker: str | None) -> Placed:
        """:meth:`place`, from objects placed ahead: the next call with the same arguments is ready.

        Placing an object is a task through the scheduler (15-30 ms to its first answer, against
        2-4 ms for a later call, on an idle machine): a loop step's refit groups, the same each
        step, are placed while the step before runs. The one placed for the next call lives until
        then, or until the cluster closes.
        """
        key = pickle.dumps((kind, args, worker), protocol=pickle.HIGHEST_PROTOCOL)
        placed = self._ahead.pop(key, None) or self.place(kind, args, worker)
        self._ahead[key] = self.place(kind, args, worker)
        return placed

    def ask(
        self,
        calls: Sequence[tuple[Placed, str, tuple[Any, ...]]],
        on_answer: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """``[handle.method(*args) for handle, method, args in calls]``, all at once, in that order.

        Each call goes to its object's worker directly (no task: a round trip of a few
        milliseconds where a task takes 10-20 under load), and the client waits for all of them
        at once; an object runs one call at a time. None for a call whose worker was lost, and
        its object with it (place another). An error a method raises is raised here, as it is.
        ``on_answer(i, value)`` is called in this thread as each call is answered (progress).

        A :class:`Kept` argument goes with its value only to an object that does not keep it
        yet; that call goes first, and the object's other calls once it is answered (calls sent
        at once may arrive in any order). A :class:`Payload` is pickled once for every call.

        With :attr:`in_loop` (local worker processes), a call runs on its worker's event loop
        rather than being handed to the worker's actor thread and its answer handed back: with
        the cores busy, each hand-off waits for the thread to be scheduled. A worker runs one
        call at a time either way, and its loop has nothing else to do meanwhile. An object's
        first call still runs on the thread: it may open the object (load its data, replay
        earlier requests), long enough for the worker's heartbeats to need the loop; so do the
        calls of an object placed with ``in_loop=False`` (a pass's parts).
        """
        import asyncio

        sent = [tuple(_sent(handle, arg) for arg in args) for handle, _, args in calls]
        first: dict[int, int] = {}  # per object, its call that brings it a Kept value
        for i, (handle, _, _) in enumerate(calls):
            if any(isinstance(a, Kept) and a.pickled is not None for a in sent[i]):
                first.setdefault(id(handle), i)
        done: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()

        async def one(i: int) -> None:
            handle, method, _ = calls[i]
            where = {"separate_thread": False} if self.in_loop and handle.in_loop and handle.answered else {}
            try:
                if handle.actor is None:
                    handle.actor = await handle.future
                answer = await handle.actor.answer(method, *sent[i], **where)
            except (OSError, RuntimeError, asyncio.CancelledError) as exc:
                # Dask: "Worker holding Actor was lost", or its placement cancelled with the worker
                answer = exc if isinstance(exc, OSError) else OSError(str(exc))
            except BaseException as exc:  # raised again on the client
                answer = exc
            done.put((i, answer))

        async def after(i: int, later: list[int]) -> None:
            await one(i)
            await asyncio.gather(*(one(j) for j in later))

        async def send() -> None:
            by_object: dict[int, list[int]] = {}
            for i, (handle, _, _) in enumerate(calls):
                by_object.setdefault(id(handle), []).append(i)
            pending = []
            for key, mine in by_object.items():
                if key in first:
                    head = first[key]
                    pending.append(after(head, [j for j in mine if j != head]))
                else:
                    pending.extend(one(j) for j in mine)
            await asyncio.gather(*pending)

        running = asyncio.run_coroutine_threadsafe(send(), self.client.loop.asyncio_loop)
        results: list[Any] = [None] * len(calls)
        for _ in calls:
            i, answer = done.get()
            handle = calls[i][0]
            if isinstance(answer, OSError):  # the worker did not answer: lost
                continue
            if isinstance(answer, BaseException):
                running.cancel()
                raise answer
            handle.answered = True
            ok, value = answer
            if not ok:
                running.cancel()
                raise value  # the exception the method raised
            results[i] = value
            if on_answer is not None:
                on_answer(i, value)
        running.result()
        return results

    def close(self) -> None:
        """Disconnect (and stop a local cluster this client started), once it has started."""
        if self._client is None:
            assert self._starting is not None
            if self._starting.exception() is not None:
                return  # a start that failed closed what it had started
        client = self.client
        cluster = getattr(client, "cluster", None)
        client.close()
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
    """The client of :func:`open_cluster`, closed on exit.

    ``local:N`` workers start on a thread while the caller goes on (1.5 s to a ready cluster of
    two on an idle machine, a tenth of a compress of the MNIST sample): the first call that needs
    them waits for them (:attr:`Cluster.client`), and work that can run here meanwhile asks
    :attr:`Cluster.ready`. A scheduler address is connected to at once: one that does not answer
    is an error before any work.
    """
    if count is not None:
        threads = max(1, cores() // count)
        in_loop = processes  # thread workers share this process's event loop: one at a time on it
        starting: Future[Any] = Future()

        def start() -> None:
            try:
                starting.set_result(_local_client(count, processes, dask, distributed))
            except BaseException as exc:  # raised where the client is first needed
                starting.set_exception(exc)

        threading.Thread(target=start, name="egp-cluster-start", daemon=True).start()
        cluster = Cluster(starting, threads, in_loop)
    else:
        try:
            client = distributed.Client(spec, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"--scheduler {spec}: no Dask scheduler reachable ({one_line(exc)})") from exc
        # a remote worker's long calls would stall its heartbeats: off its event loop
        cluster = Cluster(client, threads=0, in_loop=False)
    try:
        if count is None:
            _wait_for_workers(cluster.client, spec)
        yield cluster
    finally:
        cluster.close()


def _local_client(count: int, processes: bool, dask: Any, distributed: Any) -> Any:
    """A client of ``count`` new local workers, once one is up."""
    # Dask's nanny sets its workers' environment (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_, ...)
    # in this process's os.environ before it spawns them, and leaves it there: a library must not
    # change its caller's environment (a later torch, a subprocess would inherit it). Not asked
    # for, and what it changes is put back key by key (never cleared: this runs on a thread while
    # the caller's thread may read the environment).
    environ = dict(os.environ)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {}, **_forked(dask, distributed)}):
            local = _local_cluster(distributed, count, processes)
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
    # The workers are on this machine: the client talks to them directly (a resident's answers do
    # not pass through the scheduler's process on their way).
    client = distributed.Client(local, direct_to_workers=True)
    try:
        _wait_for_workers(client, f"local:{count}")
    except BaseException:
        client.close()
        local.close()
        raise
    return client


def _wait_for_workers(client: Any, spec: str) -> None:
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
    except TimeoutError as exc:
        raise ConfigError(f"--scheduler {spec}: the scheduler has no workers") from exc


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
