"""Statistics passes on a Dask cluster: the same bytes as one process, a dead worker's parts rerun.

Every cluster here is a LocalCluster on 127.0.0.1 started by the test and stopped with it: thread
workers (processes=False) where a process pool would only cost start-up time, real worker
processes where the test is about processes (a killed worker, the command line's local:N).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import socket
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_checks import one_line_error
from conftest import SAMPLES
from models import inputs, residual_block, save, toy_files
from onnx import numpy_helper

import egp_onnx
from egp_onnx.api import compress as compress_module
from egp_onnx.calibrate import collect
from egp_onnx.cli.main import main
from egp_onnx.config import Settings
from egp_onnx.errors import ConfigError
from egp_onnx.graph.layers import linear_layers
from egp_onnx.graph.rectifiers import find_rectifiers
from egp_onnx.load.calibration import open_calibration
from egp_onnx.load.model import load_model, prepare_model
from egp_onnx.load.parts import plan_parts
from egp_onnx.prune import loop as loop_module
from egp_onnx.reconstruct import parts as refit_parts
from egp_onnx.reconstruct import refit as refit_module
from egp_onnx.reconstruct.refit import reconstruct
from egp_onnx.runtime import cluster as cluster_module
from egp_onnx.runtime.cluster import INSTALL_HINT, local_workers, open_cluster
from egp_onnx.verify import guard as guard_module
from egp_onnx.verify.fidelity import Reference
from egp_onnx.verify.guard import Guard

pytest.importorskip("distributed", reason="the cluster needs the optional egp-onnx[dask]")

MNIST = SAMPLES / "mnist_resnet.onnx"
MNIST_CALIB = SAMPLES / "mnist_calib.npz"


@pytest.fixture(scope="module")
def threads():
    """Two thread workers in this process (one start for the module's tests)."""
    with open_cluster("local:2", processes=False) as cluster:
        yield cluster


def same_statistics(a, b):
    assert a.samples == b.samples and a.counts.keys() == b.counts.keys()
    for name in a.counts:
        assert np.array_equal(a.counts[name].on, b.counts[name].on), name
        assert a.counts[name].on.dtype == b.counts[name].on.dtype == np.int64
        assert a.counts[name].total == b.counts[name].total, name


def test_scheduler_specs_are_checked():
    assert local_workers("local:3") == 3
    assert local_workers("tcp://10.0.0.1:8786") is None
    for bad in ("local:0", "local:", "local:two", "  "):
        with pytest.raises(ConfigError):
            local_workers(bad)


def _slow_square(x: int) -> int:
    time.sleep(random.random() * 0.05)
    return x * x


def _slow_power(exponent: int, offset: int, x: int) -> int:
    time.sleep(random.random() * 0.05)
    return (x + offset) ** exponent


class _Counter(cluster_module.Resident):
    """A resident that says what it was built with and how many calls it has had."""

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, 0

    def ping(self) -> tuple[str, int]:
        self.calls += 1
        return self.name, self.calls


def test_an_object_placed_ahead_is_the_next_calls_and_a_fresh_one_waits_for_the_one_after(threads):
    worker = threads.addresses[0]
    threads._ahead.clear()  # what other tests' refits placed ahead
    first = threads.place_ahead(_Counter, ("a",), worker)
    ahead = next(iter(threads._ahead.values())) if len(threads._ahead) == 1 else None
    assert ahead is not None and ahead is not first  # the next call's object, placed now
    assert threads.ask([(first, "ping", ())]) == [("a", 1)]
    second = threads.place_ahead(_Counter, ("a",), worker)
    assert second is ahead  # placed by the call before
    assert threads.ask([(second, "ping", ())]) == [("a", 1)]  # a new object, not the first again
    other = threads.place_ahead(_Counter, ("b",), worker)  # other arguments: placed now
    assert other is not ahead and threads.ask([(other, "ping", ())]) == [("b", 1)]
    threads._ahead.clear()


def test_run_parts_returns_results_in_the_order_of_the_items_whatever_finishes_first(threads):
    done = []
    kept = threads.kept_once("test", 2)
    items = [(i,) for i in range(12)]
    found = threads.run_parts(_slow_power, [kept], (1,), items, lambda i, r: done.append((i, r)))
    assert found == [(i + 1) ** 2 for i in range(12)]
    assert sorted(done) == [(i, (i + 1) ** 2) for i in range(12)]  # each part reported once


def test_an_error_of_a_task_is_raised_as_it_is(threads, tmp_path, rng):
    model = prepare_model(residual_block(rng))
    np.savez(tmp_path / "c.npz", x=inputs(rng, 8, (4, 6, 6)))
    data = open_calibration(tmp_path / "c.npz", model)
    (tmp_path / "c.npz").write_bytes(b"not an npz any more")  # the workers read the path itself
    with pytest.raises(egp_onnx.EgpError, match="cannot read calibration file"):
        collect.collect_statistics(model, find_rectifiers(model), data, 4, cluster=threads)


@pytest.mark.parametrize("batch_size", [3, 32])
def test_statistics_on_a_cluster_equal_one_process(threads, tmp_path, rng, batch_size):
    model = prepare_model(residual_block(rng))
    for i, n in enumerate([100, 37, 300]):  # files of sizes that are no multiple of the batch
        np.savez(tmp_path / f"{i}.npz", x=inputs(rng, n, (4, 6, 6)))
    sites = find_rectifiers(model)
    single = collect.collect_statistics(model, sites, open_calibration(tmp_path, model), batch_size)
    seen: list[int] = []
    data = open_calibration(tmp_path, model)
    kept = len(threads._kept)
    for _ in range(2):  # a second pass reuses the workers' copy of the loaders
        seen.clear()
        spread = collect.collect_statistics(model, sites, data, batch_size, seen.append, cluster=threads)
        same_statistics(single, spread)
        assert sum(seen) == 437  # progress: every part once
        assert len(threads._kept) == kept + 1  # the data's loaders went to the workers once


def test_compress_on_a_cluster_writes_the_same_model_and_report(threads, tmp_path, rng, monkeypatch):
    model, calib = toy_files(tmp_path, rng)
    options = {"sparsity": 0.5, "latency": False, "batch_size": 4}
    single = egp_onnx.compress(model, calib, **options)
    # local:2 as thread workers of this process (real processes: the killed worker's test)
    monkeypatch.setattr(cluster_module, "open_cluster", partial(open_cluster, processes=False))
    spread = egp_onnx.compress(model, calib, scheduler="local:2", **options)
    assert spread.model.SerializeToString() == single.model.SerializeToString()
    assert spread.report.to_dict() == single.report.to_dict()


def test_stats_on_local_workers_write_the_same_bytes(runner, tmp_path, monkeypatch, caplog):
    dask_level = logging.getLogger("distributed").level
    monkeypatch.setattr(cluster_module, "open_cluster", partial(open_cluster, processes=False))
    args = ["stats", str(MNIST), "--calib", str(MNIST_CALIB), "--batch-size", "64"]
    alone = runner.invoke(main, [*args, "-o", str(tmp_path / "a.npz")])
    assert alone.exit_code == 0, alone.output
    with caplog.at_level(logging.INFO):
        spread = runner.invoke(main, [*args, "-o", str(tmp_path / "b.npz"), "--scheduler", "local:2"])
    assert spread.exit_code == 0, spread.output + spread.stderr
    chatter = [r.getMessage() for r in caplog.records if r.name.startswith("distributed")]
    assert not chatter, chatter[:3]  # Dask's INFO lines (a line per scheduler event) stay out
    assert logging.getLogger("distributed").level == dask_level  # and its level is put back
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


ORIGINAL_COUNT_PART = collect.count_part


def count_part_or_die(*args):
    """count_part, except that the first attempt at the second part kills its worker process."""
    marker = Path(os.environ["EGP_TEST_DIE_ONCE"])
    part = args[7]
    if part.pieces[0][1] > 0 and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)  # the worker process dies mid-pass, as on a machine that goes away
    return ORIGINAL_COUNT_PART(*args)


def test_a_killed_worker_has_its_parts_rerun_and_merged_once(tmp_path, monkeypatch):
    model = load_model(MNIST)
    sites = find_rectifiers(model)
    single = collect.collect_statistics(model, sites, open_calibration(MNIST_CALIB, model), 64)
    marker = tmp_path / "died"
    monkeypatch.setenv("EGP_TEST_DIE_ONCE", str(marker))  # before the workers start: they inherit it
    monkeypatch.setattr(collect, "count_part", count_part_or_die)
    seen: list[int] = []
    environ = dict(os.environ)
    with open_cluster("local:2") as cluster:
        pids = set(cluster.client.run(os.getpid).values())  # the workers are up
        assert dict(os.environ) == environ  # Dask's nanny would leave OMP_NUM_THREADS=1 etc. here
        data = open_calibration(MNIST_CALIB, model)
        spread = collect.collect_statistics(model, sites, data, 64, seen.append, cluster=cluster)
    assert int(marker.read_text()) in pids  # a worker did die
    same_statistics(single, spread)
    assert sum(seen) == 2000 and len(seen) == 8  # 8 parts of 256 (or fewer): each merged once


def _held_start(monkeypatch, release):
    """local:N workers whose start waits for ``release`` (threading.Event)."""
    start = cluster_module._local_client

    def held(*args):
        assert release.wait(60)
        return start(*args)

    monkeypatch.setattr(cluster_module, "_local_client", held)


def test_local_workers_start_while_the_caller_goes_on(monkeypatch):
    release = threading.Event()
    _held_start(monkeypatch, release)
    with open_cluster("local:1", processes=False) as cluster:
        assert not cluster.ready  # open_cluster returned before the workers are up
        release.set()
        assert cluster.workers == 1  # the first use waits for them
        assert cluster.ready


def test_a_local_start_that_fails_raises_where_the_workers_are_first_needed(monkeypatch):
    def failing(*args):
        raise ConfigError("--scheduler local:1: the scheduler has no workers")

    monkeypatch.setattr(cluster_module, "_local_client", failing)
    with open_cluster("local:1", processes=False) as cluster:
        with pytest.raises(ConfigError, match="has no workers"):
            _ = cluster.workers
        assert not cluster.ready
    # and the exit closed nothing twice: leaving the block did not raise


def test_a_compress_whose_workers_are_not_up_calibrates_the_original_here(tmp_path, rng, monkeypatch):
    model, calib = toy_files(tmp_path, rng)
    options = {"sparsity": 0.5, "latency": False, "batch_size": 4}
    single = egp_onnx.compress(model, calib, **options)
    monkeypatch.setattr(cluster_module, "open_cluster", partial(open_cluster, processes=False))
    release, where = threading.Event(), []
    _held_start(monkeypatch, release)
    original = collect.collect_statistics

    def passes(*args, **kwargs):
        cluster = kwargs.get("cluster", args[6] if len(args) > 6 else None)
        where.append(cluster is not None)
        release.set()  # the workers come up once the first pass has started here
        return original(*args, **kwargs)

    monkeypatch.setattr(compress_module, "collect_statistics", passes)
    monkeypatch.setattr(loop_module, "collect_statistics", passes)
    spread = egp_onnx.compress(model, calib, scheduler="local:2", **options)
    assert where[0] is False and any(where[1:]), where  # the original's pass here, later ones there
    assert spread.model.SerializeToString() == single.model.SerializeToString()
    assert spread.report.to_dict() == single.report.to_dict()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_one_line_before_any_work(runner, tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_module, "CONNECT_TIMEOUT", 1)
    model, calib = toy_files(tmp_path, np.random.default_rng(0))
    address = f"tcp://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    for command in (
        ["stats", "-o", str(tmp_path / "s.npz")],
        ["analyze"],
        ["compress", "-o", str(tmp_path / "o.onnx")],
    ):
        result = runner.invoke(
            main, [command[0], model, "--calib", calib, *command[1:], "--scheduler", address]
        )
        line = one_line_error(result)
        assert f"--scheduler {address}: no Dask scheduler reachable" in line, line
    assert time.monotonic() - started < 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx"]  # nothing written


def test_without_dask_the_option_says_how_to_get_it(runner, tmp_path, monkeypatch):
    model, calib = toy_files(tmp_path, np.random.default_rng(0))
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed raises ImportError
    result = runner.invoke(main, ["analyze", model, "--calib", calib, "--scheduler", "local:2"])
    assert one_line_error(result) == f"egp-onnx: error: {INSTALL_HINT}"


# --- the refit's normal equations and the guard's comparison sums on the cluster ---------------


def _pruned(model, rng, fraction=0.4):
    """``model`` with ``fraction`` of each conv's weights zeroed at random (a loop step's model)."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    for t in pruned.graph.initializer:
        if t.name.endswith(".w") or len(t.dims) == 4:
            w = numpy_helper.to_array(t).copy()
            w[rng.random(w.shape) < fraction] = 0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    return pruned


def _refit_case(tmp_path, rng, samples=600):
    model = prepare_model(residual_block(rng))
    for i, n in enumerate([samples // 3, samples - samples // 3]):
        np.savez(tmp_path / f"{i}.npz", x=inputs(rng, n, (4, 6, 6)))
    layers, _ = linear_layers(model)
    remove = {layer.weight: 5 for layer in layers}
    return model, open_calibration(tmp_path, model), remove


@pytest.mark.parametrize("step", [1, 2])  # the first step refits the dense model itself
def test_refit_sums_on_a_cluster_equal_one_process(threads, tmp_path, rng, step):
    model, data, remove = _refit_case(tmp_path, rng)
    current = model if step == 1 else _pruned(model, rng)
    assert len(plan_parts(data, 32)) == 3  # 600 samples: the sums of three parts are added
    options = {"remove": remove, "masked": list(remove), "seed": 7}
    alone = reconstruct(model, current, data, 32, **options)
    spread = reconstruct(model, current, data, 32, cluster=threads, **options)
    # Every layer is solved (the first, barely pruned in step 1, may keep its pruned weights: its
    # refit fits its rows no better, the same verdict from the same sums).
    assert spread.fits == alone.fits and all(f.status == "refit" for f in alone.fits[1:])
    assert alone.fits[0].status == "refit" or alone.fits[0].status.startswith("not refit: the refit's error")
    assert spread.model.SerializeToString() == alone.model.SerializeToString()


def test_a_later_step_asks_each_layer_once_for_the_same_sums(threads, tmp_path, rng, monkeypatch):
    model, data, remove = _refit_case(tmp_path, rng)
    current = _pruned(model, rng)
    options = {"remove": remove, "masked": list(remove), "seed": 7}
    alone = reconstruct(model, current, data, 32, **options)
    reconstruct(model, current, data, 32, cluster=threads, **options)  # a step: the rows each part keeps
    asked = _losing(threads, monkeypatch, set())
    spread = reconstruct(model, current, data, 32, cluster=threads, **options)
    assert asked["asks"] == len(alone.fits)  # planned from the last step's rows: one request a layer
    assert spread.fits == alone.fits
    assert spread.model.SerializeToString() == alone.model.SerializeToString()


def test_a_layer_too_wide_to_refit_is_skipped_by_the_dense_tensors_run_ahead(
    threads, tmp_path, rng, monkeypatch
):
    # The workers run the dense model's next request while the client solves: the next layer
    # that asks for its equations, past conv1 (37 columns), which is not refit.
    monkeypatch.setattr(refit_module, "WIDTH_LIMIT", 36)
    model, data, remove = _refit_case(tmp_path, rng)
    current = _pruned(model, rng)
    options = {"remove": remove, "masked": list(remove), "seed": 7}
    alone = reconstruct(model, current, data, 32, **options)
    assert [f.status.startswith("not refit: 37 columns") for f in alone.fits] == [False, True, False, False]
    for _ in range(2):  # the second step planned from the first's rows
        spread = reconstruct(model, current, data, 32, cluster=threads, **options)
        assert spread.fits == alone.fits
        assert spread.model.SerializeToString() == alone.model.SerializeToString()


def _losing(cluster, monkeypatch, lost):
    """``cluster.ask`` as if the workers of some calls were lost: ``lost`` holds (ask, call, method).

    ``ask`` counts the calls of ``ask`` from 1, ``call`` the calls in it from 0. Such a call is not
    sent and its answer is None, as for a lost worker: the client places the group again, and the
    new one replays every earlier request.
    """
    original, asked = cluster.ask, {"asks": 0, "lost": []}

    def ask(calls, on_answer=None):
        asked["asks"] += 1
        keep = [(asked["asks"], i, _name(call)) not in lost for i, call in enumerate(calls)]
        sent = [i for i, k in enumerate(keep) if k]

        def answered(j, value):
            if on_answer is not None:
                on_answer(sent[j], value)

        answers = iter(original([calls[i] for i in sent], answered))
        asked["lost"] += [(asked["asks"], i, _name(call)) for i, call in enumerate(calls) if not keep[i]]
        return [next(answers) if k else None for k in keep]

    monkeypatch.setattr(cluster, "ask", ask)
    return asked


def test_a_refit_group_that_loses_its_worker_is_rebuilt_with_the_same_sums(
    threads, tmp_path, rng, monkeypatch
):
    model, data, remove = _refit_case(tmp_path, rng)
    options = {"remove": remove, "masked": list(remove), "seed": 7}
    alone = reconstruct(model, model, data, 32, **options)
    # The first step: two asks per layer (rows, then sums). Lost: group 0 before the third
    # layer's first request (one more ask: its replacement's), and group 1 between the last
    # layer's two requests.
    lost = {(5, 0, "layer_rows"), (2 * len(alone.fits) + 1, 1, "sums")}
    asked = _losing(threads, monkeypatch, lost)
    spread = reconstruct(model, model, data, 32, cluster=threads, **options)
    assert set(asked["lost"]) == lost
    assert spread.fits == alone.fits
    assert spread.model.SerializeToString() == alone.model.SerializeToString()


class _DyingGroup(refit_parts._Group):
    """A group whose worker process dies on its third layer, in one worker once (a machine that goes away)."""

    calls = 0

    def layer_rows(self, *args):
        _DyingGroup.calls += 1
        if _DyingGroup.calls == 3:
            try:  # the first worker here creates the marker; the others go on
                marker = os.open(os.environ["EGP_TEST_DIE_ONCE"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(marker, str(os.getpid()).encode())
                os._exit(1)
        return super().layer_rows(*args)


def test_a_refit_on_workers_one_of_which_dies_gives_the_same_model(tmp_path, rng, monkeypatch):
    model, data, remove = _refit_case(tmp_path, rng)
    pruned = _pruned(model, rng)
    options = {"remove": remove, "masked": list(remove), "seed": 7}
    alone = reconstruct(model, pruned, data, 32, **options)
    marker = tmp_path / "died"
    monkeypatch.setenv("EGP_TEST_DIE_ONCE", str(marker))  # before the workers start: they inherit it
    monkeypatch.setattr(refit_parts, "_Group", _DyingGroup)
    with open_cluster("local:2") as cluster:
        pids = set(cluster.client.run(os.getpid).values())
        spread = reconstruct(model, pruned, data, 32, cluster=cluster, **options)
        # a second step: the groups plan their rows from the first's, one request a layer
        again = reconstruct(model, pruned, data, 32, cluster=cluster, **options)
    assert int(marker.read_text()) in pids  # a worker did die
    assert spread.fits == again.fits == alone.fits
    assert (
        spread.model.SerializeToString() == again.model.SerializeToString() == alone.model.SerializeToString()
    )


def _guard_case(tmp_path, rng):
    """A residual block, its reference on 700 held-out samples (3 parts), an error guard, a candidate."""
    model = prepare_model(residual_block(rng))
    np.savez(tmp_path / "held.npz", x=inputs(rng, 700, (4, 6, 6)))
    reference = Reference(model, open_calibration(tmp_path / "held.npz", model), 32)
    assert len(reference.parts()) == 3
    return model, reference, Settings(max_rel_error=0.01), _pruned(model, rng)


def test_guard_sums_on_a_cluster_equal_one_process(threads, tmp_path, rng):
    model, reference, settings, candidate = _guard_case(tmp_path, rng)
    alone = Guard(reference, settings, lambda m: {})(candidate)
    spread = Guard(reference, settings, lambda m: {}, cluster=threads)(candidate)
    assert spread == alone and alone[1]  # the same fidelity, to the bit, and the same complaints
    kept = len(threads._kept)
    Guard(reference, settings, lambda m: {}, cluster=threads)(_pruned(model, rng))
    assert len(threads._kept) == kept  # the held-out parts went to the workers once


def test_a_statistics_pass_that_loses_a_worker_reruns_its_parts_and_merges_each_once(
    threads, tmp_path, rng, monkeypatch
):
    model, data, _ = _refit_case(tmp_path, rng)
    sites = find_rectifiers(model)
    alone = collect.collect_statistics(model, sites, data, 32)
    assert len(plan_parts(data, 32)) == 3  # on two runners: parts 0 and 2 on one, 1 on the other
    asked = _losing(threads, monkeypatch, {(1, 1, "count_part")})  # part 1's worker lost
    seen: list[int] = []
    spread = collect.collect_statistics(model, sites, data, 32, seen.append, cluster=threads)
    assert asked["lost"] == [(1, 1, "count_part")] and asked["asks"] == 2  # part 1 asked again, alone
    assert sorted(seen) == sorted(p.samples for p in plan_parts(data, 32))  # each part counted once
    same_statistics(alone, spread)


def test_a_guard_measurement_that_loses_a_worker_reruns_its_parts_and_merges_each_once(
    threads, tmp_path, rng, monkeypatch
):
    model, reference, settings, candidate = _guard_case(tmp_path, rng)
    alone = Guard(reference, settings, lambda m: {})(candidate)
    # Two runners: parts 0 and 2 on one, 1 on the other. Lost: part 1 (the only call to its
    # runner) in the first ask, and part 2 (after part 0, answered, on the same runner) in the
    # next candidate's first ask; each is asked again alone, on a runner placed anew.
    asked = _losing(threads, monkeypatch, {(1, 1, "guard_part"), (3, 2, "guard_part")})
    spread = Guard(reference, settings, lambda m: {}, cluster=threads)(candidate)
    assert asked["asks"] == 2 and spread == alone  # the same sums: no part merged twice, none missing
    other = _pruned(model, rng)
    again = Guard(reference, settings, lambda m: {}, cluster=threads)(other)
    assert asked["asks"] == 4 and again == Guard(reference, settings, lambda m: {})(other)
    assert asked["lost"] == [(1, 1, "guard_part"), (3, 2, "guard_part")]


def guard_part_or_die(*args):
    """guard_part, except that the first attempt at the second part kills its worker process."""
    marker = Path(os.environ["EGP_TEST_DIE_ONCE"])
    if args[-1] == 1 and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)  # the worker process dies mid-measurement
    return ORIGINAL_GUARD_PART(*args)


ORIGINAL_GUARD_PART = guard_module.guard_part


def test_a_killed_worker_during_a_guard_measurement_has_its_parts_rerun(tmp_path, rng, monkeypatch):
    model = prepare_model(residual_block(rng))
    np.savez(tmp_path / "held.npz", x=inputs(rng, 700, (4, 6, 6)))
    reference = Reference(model, open_calibration(tmp_path / "held.npz", model), 32)
    settings = Settings(max_rel_error=0.01)
    candidate = _pruned(model, rng)
    alone = Guard(reference, settings, lambda m: {})(candidate)
    marker = tmp_path / "died"
    monkeypatch.setenv("EGP_TEST_DIE_ONCE", str(marker))  # before the workers start: they inherit it
    monkeypatch.setattr(guard_module, "guard_part", guard_part_or_die)
    with open_cluster("local:2") as cluster:
        pids = set(cluster.client.run(os.getpid).values())
        spread = Guard(reference, settings, lambda m: {}, cluster=cluster)(candidate)
    assert int(marker.read_text()) in pids  # a worker did die
    assert spread == alone  # every part's sums once: a part merged twice would change them


def _name(call):
    """A call's method, or for a pass's part (a runner's ``run``) the function it runs."""
    _, method, args = call
    return args[0].__name__ if method == "run" else method


def _result_sizes(cluster, monkeypatch):
    """The pickled size of every task's result and every resident's answer, by name."""
    sizes: dict[str, list[int]] = {}
    original_ask = cluster.ask

    def asking(calls, on_answer=None):
        answers = original_ask(calls, on_answer)
        for call, answer in zip(calls, answers, strict=True):
            sizes.setdefault(_name(call), []).append(len(pickle.dumps(answer)))
        return answers

    monkeypatch.setattr(cluster, "ask", asking)
    return sizes


def test_what_a_refit_or_guard_task_sends_back_does_not_grow_with_its_samples(
    threads, tmp_path, rng, monkeypatch
):
    found = []
    for n in (64, 256):  # one part each: 4x the samples
        folder = tmp_path / str(n)
        folder.mkdir()
        model, data, remove = _refit_case(folder, np.random.default_rng(0), n)
        sizes = _result_sizes(threads, monkeypatch)
        reconstruct(model, model, data, 32, remove=remove, masked=list(remove), cluster=threads)
        reference = Reference(model, data, 32)
        Guard(reference, Settings(), lambda m: {}, cluster=threads)(_pruned(model, rng))
        monkeypatch.undo()
        found.append(sizes)
    small, large = found
    assert small.keys() == large.keys() == {"layer_rows", "sums", "guard_part"}
    for name in small:  # a few bytes for a larger integer count at most
        assert len(small[name]) == len(large[name])
        assert max(abs(a - b) for a, b in zip(small[name], large[name], strict=True)) <= 8, name


def test_compress_with_refit_and_guard_on_a_cluster_writes_the_same_bytes(
    threads, tmp_path, rng, monkeypatch
):
    model = save(residual_block(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=inputs(rng, 1200, (4, 6, 6)))  # a held-out split of 3 parts
    options = {"sparsity": 0.5, "latency": False, "batch_size": 32, "max_rel_error": 0.2}
    single = egp_onnx.compress(model, str(tmp_path / "c.npz"), **options)
    monkeypatch.setattr(cluster_module, "open_cluster", partial(open_cluster, processes=False))
    names = _task_names(monkeypatch)
    spread = egp_onnx.compress(model, str(tmp_path / "c.npz"), scheduler="local:2", **options)
    assert {"layer_rows", "sums", "guard_part", "count_part"} <= names  # each ran on the cluster
    assert spread.model.SerializeToString() == single.model.SerializeToString()
    assert spread.report.to_dict() == single.report.to_dict()


def _task_names(monkeypatch):
    """The residents' methods (a pass's parts: their functions) every cluster compress opens runs."""
    names: set[str] = set()
    original_ask = cluster_module.Cluster.ask

    def asking(self, calls, on_answer=None):
        names.update(_name(call) for call in calls)
        return original_ask(self, calls, on_answer)

    monkeypatch.setattr(cluster_module.Cluster, "ask", asking)
    return names
