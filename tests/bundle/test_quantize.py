"""The search for the fewest fp32 nodes, and the feeds int8 calibration and timing are built from."""

from __future__ import annotations

import math

import numpy as np
import pytest

from export.quantize import pad_feeds, sample_indices, smallest_passing


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 13, 16, 40])
def test_smallest_passing_finds_the_threshold_in_few_calls(limit):
    for threshold in range(1, limit + 1):
        calls: list[int] = []

        def passes(k: int, t=threshold, seen=calls) -> bool:
            seen.append(k)
            return k >= t

        assert smallest_passing(limit, passes) == threshold
        assert len(calls) <= 2 * math.ceil(math.log2(limit)) + 2
        assert all(1 <= k <= limit for k in calls)


@pytest.mark.parametrize("limit", [0, 1, 5, 16])
def test_smallest_passing_is_none_when_even_the_limit_fails(limit):
    calls: list[int] = []
    assert smallest_passing(limit, lambda k: calls.append(k) or False) is None
    assert (max(calls) == limit) if limit else not calls  # the largest allowed set was tried


def test_calibration_sample_is_seeded_and_within_range():
    a, b = sample_indices(1000, 256, seed=42), sample_indices(1000, 256, seed=42)
    assert a == b and len(set(a)) == 256 and all(0 <= i < 1000 for i in a)
    assert sample_indices(1000, 256, seed=43) != a
    assert sample_indices(10, 256, seed=1) == list(range(10))


def test_pad_feeds_pads_each_batch_to_its_longest_and_keeps_every_row():
    rows = [{"input_ids": [5] * n, "attention_mask": [1] * n, "token_type_ids": None} for n in (3, 9, 4, 8, 2)]
    feeds = pad_feeds(rows, ["input_ids", "attention_mask", "token_type_ids"], pad_id=0, batch_size=2)
    assert sum(f["input_ids"].shape[0] for f in feeds) == len(rows)
    for feed in feeds:
        width = feed["input_ids"].shape[1]
        lengths = feed["attention_mask"].sum(1)
        assert width == lengths.max() and feed["input_ids"].dtype == np.int64
        assert (feed["input_ids"][feed["attention_mask"] == 0] == 0).all()
        assert (feed["token_type_ids"] == 0).all()
    assert sorted(int(n) for f in feeds for n in f["attention_mask"].sum(1)) == [2, 3, 4, 8, 9]
    assert [f["input_ids"].shape[0] for f in pad_feeds(rows, ["input_ids"], 0, 1)] == [1] * 5
