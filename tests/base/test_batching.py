"""zeroship.batching: the one length-bucketing batcher (training, evaluation, the runtime)."""

from __future__ import annotations

from zeroship.batching import length_sorted_batches


def test_sorted_by_length_stable_and_cut_by_batch_size():
    lengths = [5, 3, 5, 1, 3, 9]
    assert length_sorted_batches(range(6), lengths, 2) == [[3, 1], [4, 0], [2, 5]]
    # ties keep the order they were given in (a shuffled training order stays shuffled among equals)
    assert length_sorted_batches([2, 0, 4, 1], lengths, 3) == [[4, 1, 2], [0]]
    assert length_sorted_batches([], lengths, 4) == []


def test_pad_slack_ends_a_batch_before_it_pads_too_much():
    lengths = [10, 11, 12, 30, 31]
    # 10, 11, 12 pad at most 2 tokens each; 30 would add 3 * 18 = 54 > 16 padding tokens to [10, 11, 12]
    assert length_sorted_batches(range(5), lengths, 8, pad_slack=16) == [[0, 1, 2], [3, 4]]
    assert length_sorted_batches(range(5), lengths, 8) == [[0, 1, 2, 3, 4]]
