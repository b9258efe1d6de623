"""The channel-removal stage (``--channels``): whole channels out, consumers refit, under the guard.

It runs before the weight-pruning loop, on the dense model (why: prune/channels.py's budget and
the refit need the dense consumers' equations; the loop then prunes and refits the narrower model
against it, so sparsity and channel removal compose, and the guard judges both against the
original). Steps, as the loop's:

1. statistics of the current model at each group's rectifier (graph/channels.py);
2. always-OFF channels are taken at once: they are 0 on every calibration sample, so removing
   them changes no consumer's input there (exact on that data; the guard judges held-out data);
3. the other channels are priced by what the consumers' refit cannot recover
   (reconstruct/channels.py) and the EGP budget over groups (prune/channels.py) picks them;
4. the initializers are cut (surgery/narrow.py), the consumers refit by least squares against
   the original, and the candidate is kept only if it lowers the dense MACs and passes the guard
   (in its shipped form too, with ``--quantize``: the INT8 stage after it keeps its share);
   a step that fails is rolled back and retried at half its size (:data:`RETRIES` times); when
   the smallest still fails (or rounds to nothing at the channel alignment), the stage goes on
   one group at a time: the smallest aligned cut of the group that saves the most MACs per unit
   of price (``_single_cut``); a group whose cut fails keeps its channels, the others are tried.
   The stage ends when no group can lose more. Without a guard only always-OFF
   channels go.

Before those steps, with a guard, whole residual branches go (``_empty_branches``): a block whose
branch loses every channel is ``x + c`` (c: the least-squares constant), its layers out of the
graph, the layers after it refit. A channel group keeps one aligned block at least, so only
this takes a block's MACs to zero; on the MNIST sample one branch gone bought as much time as
every group cut to 16 channels (README "Channel removal"). The Add whose branch saves the most
MACs is tried first, each kept when it passes the guard.

With a finetune callback, every candidate (an emptied branch, a channel step) is retrained before
the guard judges it, as the weight loop's steps are. Whole branches are emptied only under a
callback that ``follows_branches`` (integrations/torch.py's does: the branch's layers pass their
input through and its last returns c); under any other the constant would have no layer in the
callback's module. Channels inside branches are narrowed either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from egp_onnx import entropy as ent
from egp_onnx.calibrate.collect import collect_statistics
from egp_onnx.config import Settings
from egp_onnx.entropy import Statistics
from egp_onnx.graph.channels import Branch, ChannelGroup, channel_groups, residual_branches
from egp_onnx.graph.layers import linear_layers
from egp_onnx.graph.rectifiers import find_rectifiers
from egp_onnx.load.calibration import CalibrationData
from egp_onnx.prune.channels import aligned_count, channel_capacity, cheapest, exact_count, step_amounts
from egp_onnx.prune.finetune import Finetune, apply_finetune, follows_branches
from egp_onnx.prune.loop import Guard, LayerSet
from egp_onnx.reconstruct.channels import branch_constant, refit_consumers, removal_costs
from egp_onnx.report.records import ChannelGroupRecord, ChannelsRecord, ChannelStepRecord
from egp_onnx.surgery.narrow import narrowed, without_branch
from egp_onnx.verify.cost import count_macs

log = logging.getLogger(__name__)

#: A channel step that fails the guard is retried this many times, each at half the previous size
#: (the weight loop bisects instead; a channel step is priced per group, so halving is the search).
RETRIES = 2
#: The fraction of what the groups may lose that one step takes (halved on each rejection).
CHANNEL_STEP = 0.5
#: Steps the stage attempts at most.
MAX_CHANNEL_STEPS = 40


@dataclass(frozen=True)
class ChannelOutcome:
    """The narrowed model (the input itself when nothing went) and the stage's record."""

    model: onnx.ModelProto
    record: ChannelsRecord


def nothing_removable(tied: Mapping[str, str]) -> str:
    """The one line that says no layer has channels to give up, with the first reason."""
    if not tied:
        return "channels: nothing removable (no layer feeds a rectifier read by other layers)"
    layer, why = next(iter(tied.items()))
    return f"channels: nothing removable ({len(tied)} layer(s) with tied channels; first {layer}: {why})"


def remove_channels(
    model: onnx.ModelProto,
    data: CalibrationData,
    settings: Settings,
    guard: Guard | None,
    input_shapes: Mapping[str, tuple[int, ...]],
    on_stage: Callable[[str], None] = lambda _: None,
    finetune: Finetune | None = None,
) -> ChannelOutcome:
    """Remove whole channels from ``model`` (never modified) as the module docstring says."""
    groups, tied = channel_groups(model)
    tied_record = tuple(tied.items())
    macs_before = _macs(model, input_shapes)
    if not groups:
        log.warning("%s", nothing_removable(tied))
        record = ChannelsRecord((), tied_record, (), "nothing removable", 0, macs_before, macs_before)
        return ChannelOutcome(model, record)
    alive = {g.producer: np.arange(g.channels) for g in groups}  # original indices still present
    exact = {g.producer: 0 for g in groups}
    guarded = guard is not None and not guard.measures_only
    current, step, retries, number = model, CHANNEL_STEP, 0, 0
    single = False  # one group at a time (see _single_cut)
    rejected: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()  # cuts of ``current`` the guard rejected
    steps: list[ChannelStepRecord] = []
    frozen: set[str] = set()  # groups the guard stopped
    stop = "max-steps"
    macs_now = macs_before
    branches: list[str] = []
    if guarded and (finetune is None or follows_branches(finetune)):
        assert guard is not None
        current, macs_now, number = _empty_branches(
            model, groups, alive, data, settings, guard, input_shapes, on_stage, steps, branches, macs_now,
            finetune,
        )  # fmt: skip
    while number < MAX_CHANNEL_STEPS:
        number += 1
        on_stage(f"channels step {number}: calibrating")
        now_groups = _now_groups(groups, current)
        live = [g for g in groups if g.producer in now_groups and g.producer not in frozen]
        if not live:
            stop = "every group stopped by the guard"
            break
        now_live = {g.producer: now_groups[g.producer] for g in live}
        counts = _rectifier_counts(current, now_live, data, settings)
        dead: dict[str, np.ndarray] = {}
        for g in live:
            on, _ = counts[g.producer]
            off = np.flatnonzero(on == 0)
            # keep one channel (a layer with none left is surgery's case); alone, keep the
            # alignment too (a guarded step rounds the group's whole count instead)
            take = min(off.size, on.size - 1) if guarded else exact_count(g.channels, on.size, off.size)
            if take:
                dead[g.producer] = off[:take]
        chosen = dict(dead)
        if guarded:
            chosen, prices = _priced(
                model,
                current,
                live,
                [g for g in groups if g.producer in frozen],
                now_groups,
                counts,
                dead,
                alive,
                step,
                data,
                settings,
            )
            if single or (retries and not any(v.size for v in chosen.values())):
                # The halved steps round to nothing at the alignment (or failed): one group at a
                # time from here, the one whose smallest aligned cut saves most MACs per price.
                single = True
                chosen = _single_cut(current, live, now_groups, dead, prices, settings, input_shapes)
        if not any(v.size for v in chosen.values()):
            stop = (
                "nothing left to remove" if guarded else "always-OFF channels removed (no guard: no others)"
            )
            break
        signature = tuple(sorted((p, tuple(v.tolist())) for p, v in chosen.items()))
        removed_n = sum(v.size for v in chosen.values())
        dead_n = sum(v.size for v in dead.values())
        if signature in rejected:
            # a halved step that rounds to a cut the guard rejected: rejected again, unmeasured
            candidate, macs, agreement, error = current, None, None, None
            problems = ["the cut of a rejected step"]
        else:
            cut = [now_groups[p] for p in chosen]
            candidate = _candidate(
                model, current, cut, groups, chosen, dead, alive, data, settings, on_stage, number
            )
            macs = _macs(candidate, input_shapes)
            if macs is not None and macs_now is not None and macs >= macs_now:
                skipped = "does not lower MACs"
                steps.append(ChannelStepRecord(number, removed_n, dead_n, False, macs, None, None, skipped))
                log.info(
                    "channels step %d skipped: it does not lower the MACs (%s >= %s)", number, macs, macs_now
                )
                stop = "no step lowers the MACs"
                break
            if finetune is not None:  # dense MACs do not change with the values: measured before
                on_stage(f"channels step {number}: finetuning")
                candidate = _finetuned(candidate, finetune)
            problems, agreement, error = _judged(guard, candidate) if guard is not None else ([], None, None)
        if problems and guarded:
            if signature not in rejected:
                steps.append(
                    ChannelStepRecord(
                        number, removed_n, dead_n, False, macs, agreement, error, "; ".join(problems)
                    )
                )
            rejected.add(signature)
            if single:  # that group's smallest cut fails: it keeps its channels, the others are tried
                frozen.update(chosen)
                continue
            if retries < RETRIES:
                retries += 1
                step /= 2
                continue
            # The smallest step still fails: the group that lost the most in it keeps what it
            # has (its consumers absorb no more), and the others go on at the full step.
            priced = {p: v.size - dead.get(p, np.zeros(0)).size for p, v in chosen.items()}
            worst = max(priced, key=lambda p: priced[p])
            frozen.add(worst)
            log.info(
                "channels step %d failed the guard at the smallest step: %s keeps its channels", number, worst
            )
            retries, step = 0, CHANNEL_STEP
            continue
        steps.append(ChannelStepRecord(number, removed_n, dead_n, True, macs, agreement, error, ""))
        retries = 0
        rejected.clear()  # channel indices are the new model's from here
        for producer, local in chosen.items():
            exact[producer] += int(np.isin(local, dead.get(producer, np.zeros(0, np.int64))).sum())
            alive[producer] = np.delete(alive[producer], local)
        current, macs_now = candidate, macs
        if not guarded:
            stop = "always-OFF channels removed (no guard: no others)"
            break
    removed = sum(g.channels - alive[g.producer].size for g in groups)
    record = ChannelsRecord(
        groups=tuple(
            ChannelGroupRecord(
                g.producer, g.rectifier, tuple(c.node for c in g.consumers), g.channels,
                int(alive[g.producer].size), exact[g.producer],
            )
            for g in groups
        ),
        tied=tied_record,
        steps=tuple(steps),
        stop=stop,
        removed=removed,
        macs_before=macs_before,
        macs_after=macs_now,
        branches=tuple(branches),
    )  # fmt: skip
    return ChannelOutcome(current, record)


def _macs(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    found = count_macs(model, input_shapes) if input_shapes else None
    return found[0] if found else None


def _now_groups(groups: Sequence[ChannelGroup], current: onnx.ModelProto) -> dict[str, ChannelGroup]:
    """Per original group (by its producer's name) its form in ``current``, when it still has a producer.

    A group keeps its name while its first producer is there; an emptied branch takes a residual
    stream's producer with it, so the stream is found by any producer it still has.
    """
    now = channel_groups(current)[0]
    found = {}
    for g in groups:
        match = next((n for n in now if set(n.producers) & set(g.producers)), None)
        if match is not None:
            found[g.producer] = match
    return found


def _rectifier_counts(
    model: onnx.ModelProto, groups: Mapping[str, ChannelGroup], data: CalibrationData, settings: Settings
) -> dict[str, tuple[np.ndarray, int]]:
    """Per group (keyed as given), the ON counts of its channels over its rectifiers, and their events.

    A channel is always OFF when its sum is 0: OFF at every rectifier the consumers read through.
    """
    wanted = {name for g in groups.values() for name, _ in g.rectifiers}
    sites = [s for s in find_rectifiers(model) if s.node in wanted]
    stats: Statistics = collect_statistics(model, sites, data, settings.batch_size)
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    totals: dict[str, int] = {}
    for site in sites:
        c = stats.counts[site.name]
        parts.setdefault(site.node, []).append((site.channels[0] if site.channels else 0, c.on))
        totals[site.node] = c.total
    full = {
        node: np.concatenate([on for _, on in sorted(p, key=lambda x: x[0])]) for node, p in parts.items()
    }
    out = {}
    for key, g in groups.items():
        on = sum(full[name][offset : offset + g.channels] for name, offset in g.rectifiers)
        out[key] = (np.asarray(on), sum(totals[name] for name, _ in g.rectifiers))
    return out


def _empty_branches(
    dense: onnx.ModelProto,
    groups: Sequence[ChannelGroup],
    alive: dict[str, np.ndarray],
    data: CalibrationData,
    settings: Settings,
    guard: Guard,
    input_shapes: Mapping[str, tuple[int, ...]],
    on_stage: Callable[[str], None],
    steps: list[ChannelStepRecord],
    emptied: list[str],
    macs_now: int | None,
    finetune: Finetune | None = None,
) -> tuple[onnx.ModelProto, int | None, int]:
    """``dense`` without the residual branches the guard lets go, the most MACs first (module docstring).

    Appends each attempt to ``steps`` and each emptied Add to ``emptied``; the groups inside an
    emptied branch keep no channel in ``alive``. Returns the model, its MACs and the steps taken.
    """
    current, number = dense, 0
    tried: set[str] = set()
    savings: dict[Branch, int] = {}
    while number < MAX_CHANNEL_STEPS:
        options = _branch_options(current, tried, input_shapes, savings)
        if not options:
            break
        saved, branch = options[0]
        tried.add(branch.add)
        number += 1
        on_stage(f"channels step {number}: emptying the branch into {branch.add}")
        constant = branch_constant(dense, current, data, settings.batch_size, branch)
        cut = without_branch(current, branch, constant)
        order = [layer.name for layer in linear_layers(current)[0]]
        first = min(order.index(name) for name in branch.layers if name in order) if order else 0
        after = [name for name in order[first:] if name not in branch.layers]
        inside = [g for g in groups if set(g.producers) <= set(branch.layers)]
        gone = {g.producer: np.zeros(0, dtype=np.int64) for g in inside}
        kept = _kept_outputs(groups, {**alive, **gone})
        candidate, _ = refit_consumers(dense, cut, data, settings.batch_size, after, kept, settings.seed)
        macs = _macs(candidate, input_shapes)
        if finetune is not None:
            on_stage(f"channels step {number}: finetuning")
            candidate = _finetuned(candidate, finetune)
        problems, agreement, error = _judged(guard, candidate)
        removed = sum(alive[g.producer].size for g in inside)
        steps.append(
            ChannelStepRecord(
                number, removed, 0, not problems, macs, agreement, error, "; ".join(problems), branch.add
            )
        )
        log.info(
            "channels step %d: the branch into %s (%d MACs) %s",
            number, branch.add, saved, "rejected: " + "; ".join(problems) if problems else "emptied",
        )  # fmt: skip
        if problems:
            continue
        alive.update(gone)
        emptied.append(branch.add)
        current, macs_now = candidate, macs
    return current, macs_now, number


def _finetuned(candidate: onnx.ModelProto, finetune: Finetune) -> onnx.ModelProto:
    """``candidate`` retrained by the callback, its zero weights held at zero."""
    return apply_finetune(candidate, LayerSet(candidate, find_rectifiers(candidate)), finetune)


def _judged(guard: Guard, candidate: onnx.ModelProto) -> tuple[list[str], float | None, float | None]:
    """The guard's problems with ``candidate``, then its top-1 agreement and relative error.

    A channel step or a branch costs a calibration pass and a refit: its shipped form (INT8) is
    judged on every candidate that passes in float, so the stage ends on one that ships.
    """
    fidelity, problems = guard(candidate)
    if not problems:
        problems = guard.shipped_problems(candidate)
    if fidelity is None:
        return problems, None, None
    return problems, fidelity.top1_agreement, fidelity.rel_error


def _branch_options(
    current: onnx.ModelProto,
    tried: set[str],
    input_shapes: Mapping[str, tuple[int, ...]],
    savings: dict[Branch, int],
) -> list[tuple[int, Branch]]:
    """Per residual Add not tried yet, its operand whose removal saves the most MACs; most first.

    ``savings`` keeps what each branch saved when first measured: the same nodes cost the same
    MACs whatever else went, and each measure is a copy of the model without the branch.
    """
    branches = [branch for branch in residual_branches(current) if branch.add not in tried]
    new = [branch for branch in branches if branch not in savings]
    if new:
        macs_now = _macs(current, input_shapes)
        for branch in new:
            macs = _macs(without_branch(current, branch, np.zeros(branch.channels)), input_shapes)
            savings[branch] = len(branch.layers) if macs is None or macs_now is None else macs_now - macs
    best: dict[str, tuple[int, Branch]] = {}
    for branch in branches:
        saved = savings[branch]
        if saved > 0 and (branch.add not in best or saved > best[branch.add][0]):
            best[branch.add] = (saved, branch)
    return sorted(best.values(), key=lambda option: -option[0])


def _priced(
    dense: onnx.ModelProto,
    current: onnx.ModelProto,
    live: list[ChannelGroup],
    frozen_groups: list[ChannelGroup],
    now_groups: Mapping[str, ChannelGroup],
    counts: Mapping[str, tuple[np.ndarray, int]],
    dead: Mapping[str, np.ndarray],
    alive: Mapping[str, np.ndarray],
    step: float,
    data: CalibrationData,
    settings: Settings,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The always-OFF channels and those the EGP budget takes by entropy and refit cost; the prices.

    Prices: per group, each channel's refit cost (always-OFF channels -1: they cost nothing).
    """
    blocks: dict[str, list[np.ndarray]] = {}
    for g in live:
        now = now_groups[g.producer]
        for c in now.consumers:
            blocks.setdefault(c.node, []).extend(
                c.offset + k * c.per + np.arange(c.per) for k in range(now.channels)
            )
    costs = removal_costs(
        dense,
        current,
        data,
        settings.batch_size,
        blocks,
        _kept_outputs([*live, *frozen_groups], alive),
        settings.seed,
    )
    taken = {node: 0 for node in blocks}
    channel_cost: dict[str, np.ndarray] = {}
    for g in live:
        now = now_groups[g.producer]
        total = np.zeros(now.channels)
        for c in now.consumers:
            start = taken[c.node]
            taken[c.node] += now.channels
            if c.node not in costs:
                total += np.inf  # a consumer the solver cannot take: no priced removal here
                continue
            total += costs[c.node][start : start + now.channels]
        channel_cost[g.producer] = total
    entropy = np.array([ent.layer_entropy(*counts[g.producer]) for g in live])
    alive_n = np.array([now_groups[g.producer].channels for g in live])
    after_dead = alive_n - np.array([dead.get(g.producer, np.zeros(0)).size for g in live])
    capacity = channel_capacity(after_dead, np.array([g.channels for g in live]), settings.layer_cap)
    finite = [channel_cost[g.producer][np.isfinite(channel_cost[g.producer])] for g in live]
    mean_cost = np.array([float(f.mean()) if f.size else np.inf for f in finite])
    capacity = np.where(np.isfinite(mean_cost), capacity, 0)
    amounts = step_amounts(
        entropy, np.where(np.isfinite(mean_cost), mean_cost, 0.0), capacity, after_dead, step
    )
    chosen = {}
    prices = {}
    for g, amount, cap_left in zip(live, amounts, capacity, strict=True):
        off = dead.get(g.producer, np.zeros(0, dtype=np.int64))
        alive_now = now_groups[g.producer].channels
        floor = alive_now - off.size - int(cap_left)
        count = aligned_count(g.channels, alive_now, off.size + int(amount), floor)
        cost = channel_cost[g.producer].copy()
        cost[off] = -1.0  # always-OFF channels first: they cost nothing
        prices[g.producer] = cost
        picked = cheapest(cost, count)
        picked = picked[np.isfinite(cost[picked])]
        if picked.size:
            chosen[g.producer] = picked.astype(np.int64)
    return chosen, prices


def _single_cut(
    current: onnx.ModelProto,
    live: list[ChannelGroup],
    now_groups: Mapping[str, ChannelGroup],
    dead: Mapping[str, np.ndarray],
    prices: Mapping[str, np.ndarray],
    settings: Settings,
    input_shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """The smallest aligned cut of the one group that saves the most dense MACs per unit of price.

    What the halved steps cannot reach once they round to nothing at the alignment: with blocks of
    16 channels, a step over several groups moves several blocks at once, and fails where one would
    pass. Empty when no group has a finite-priced cut that lowers the MACs.
    """
    macs_now = _macs(current, input_shapes)
    floors = channel_capacity(
        np.array([now_groups[g.producer].channels for g in live]),
        np.array([g.channels for g in live]),
        settings.layer_cap,
    )
    best: tuple[float, str, np.ndarray] | None = None
    for g, capacity in zip(live, floors, strict=True):
        now, cost = now_groups[g.producer], prices.get(g.producer)
        if cost is None:
            continue
        off = dead.get(g.producer, np.zeros(0, dtype=np.int64))
        count = aligned_count(g.channels, now.channels, off.size + 1, now.channels - int(capacity))
        picked = cheapest(cost, count)
        if not picked.size or not np.isfinite(cost[picked]).all():
            continue
        macs = _macs(narrowed(current, [now], {g.producer: picked}), input_shapes)
        saved = (macs_now - macs) if macs is not None and macs_now is not None else picked.size
        if saved <= 0:
            continue
        score = float(np.clip(cost[picked], 0, None).sum()) / saved
        if best is None or score < best[0]:
            best = (score, g.producer, picked.astype(np.int64))
    return {} if best is None else {best[1]: best[2]}


def _kept_outputs(groups: Sequence[ChannelGroup], alive: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per layer whose output lost channels, the original channels it keeps (depthwise convs included)."""
    kept = {}
    for g in groups:
        if alive[g.producer].size < g.channels:
            for layer in (*g.producers, *g.grouped):
                kept[layer] = alive[g.producer]
    return kept


def _candidate(
    dense: onnx.ModelProto,
    current: onnx.ModelProto,
    groups: list[ChannelGroup],
    every: Sequence[ChannelGroup],
    chosen: Mapping[str, np.ndarray],
    dead: Mapping[str, np.ndarray],
    alive: Mapping[str, np.ndarray],
    data: CalibrationData,
    settings: Settings,
    on_stage: Callable[[str], None],
    number: int,
) -> onnx.ModelProto:
    """``current`` without the chosen channels, the consumers of priced ones refit.

    A group that lost only always-OFF channels lost nothing its consumers saw: they stay as
    they are, so that removal stays exact.
    """
    cut = narrowed(current, groups, chosen)
    after = {p: np.delete(alive[p], chosen[p]) if p in chosen else alive[p] for p in alive}
    kept = _kept_outputs(every, after)
    priced = [g for g in groups if not np.isin(chosen[g.producer], dead.get(g.producer, ())).all()]
    consumers = {c.node for g in priced for c in g.consumers}
    if not consumers:
        return cut
    # Every layer from the first consumer on is refit against the original, as after a pruning
    # step: the layers downstream absorb what the consumers could not.
    order = [layer.name for layer in linear_layers(cut)[0]]
    first = min(order.index(name) for name in consumers if name in order)
    consumers_and_after = order[first:]
    on_stage(f"channels step {number}: refitting {len(consumers_and_after)} layers")
    refit, _ = refit_consumers(
        dense, cut, data, settings.batch_size, consumers_and_after, kept, settings.seed
    )
    return refit
