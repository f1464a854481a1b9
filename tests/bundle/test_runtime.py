"""Batch planning in the serving runtime: length-sorted batches that never lose or repeat an item."""

from __future__ import annotations

import random

import pytest

from export.runtime import plan_batches


@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_plan_covers_every_item_once_within_the_batch_size(batch_size):
    lengths = [random.Random(s).randint(3, 120) for s in range(200)]
    batches = plan_batches(lengths, batch_size)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200))
    assert all(1 <= len(b) <= batch_size for b in batches)


def test_padding_added_per_batch_stays_within_the_slack():
    lengths = [random.Random(s).randint(3, 120) for s in range(300)]
    for slack in (0, 16, 64):
        for batch in plan_batches(lengths, 32, pad_slack=slack):
            ls = [lengths[i] for i in batch]
            assert ls == sorted(ls)
            # each member after the first raised the width by at most slack / (members before it)
            for k in range(1, len(ls)):
                assert k * (ls[k] - ls[k - 1]) <= slack


def test_equal_lengths_fill_whole_batches_and_padding_shrinks():
    assert [len(b) for b in plan_batches([10] * 70, 32)] == [32, 32, 6]
    lengths = [random.Random(s).choice([5, 60]) for s in range(64)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan_batches(lengths, 32))
    naive = sum(32 * max(lengths[i:i + 32]) for i in range(0, 64, 32))
    assert padded < naive * 0.7
