"""prune/channels: the EGP budget over channel groups, and the alignment of kept channel counts."""

from __future__ import annotations

import numpy as np

from egp_onnx.prune.channels import aligned_count, channel_capacity, cheapest, exact_count, step_amounts


def test_aligned_groups_keep_a_multiple_and_others_lose_what_is_asked():
    assert aligned_count(64, 64, 20, 1, multiple=8) == 16  # 44 kept: a tie, rounded up to 48
    assert aligned_count(64, 64, 22, 1, multiple=8) == 24  # 42 kept -> 40
    assert aligned_count(64, 64, 3, 1, multiple=8) == 8  # 61 rounds back to 64: one multiple lower
    assert aligned_count(16, 8, 4, 1, multiple=8) == 0  # 8 is the fewest an aligned group keeps
    assert aligned_count(64, 64, 44, 1) == 48  # the default multiple, 16: 20 kept -> 16
    assert aligned_count(12, 12, 5, 1) == 5  # not aligned: exactly
    assert aligned_count(12, 12, 20, 2) == 10  # never below the floor


def test_always_off_channels_alone_go_as_far_as_the_alignment_allows():
    assert exact_count(16, 16, 3, multiple=8) == 0  # 13 would break the alignment
    assert exact_count(16, 16, 9, multiple=8) == 8
    assert exact_count(32, 32, 20) == 16
    assert exact_count(6, 6, 6) == 5  # one channel stays


def test_the_cheapest_least_informative_group_takes_most_of_the_step():
    entropy = np.array([0.9, 0.2, 0.5])
    cost = np.array([1.0, 0.1, 1.0])
    alive = np.array([32, 32, 32])
    amounts = step_amounts(entropy, cost, channel_capacity(alive, alive, 0.98), alive, 0.25)
    assert list(amounts) == [0, 12, 0]  # 0.25 of the 48 the groups may lose this step (16 each)
    assert list(cheapest(np.array([3.0, 0.0, 2.0, 1.0]), 2)) == [1, 3]
