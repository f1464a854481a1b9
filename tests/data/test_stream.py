"""Batches from a streamed shard (launcher.data.stream): bounded chunks, equal counts, exact replays."""

from __future__ import annotations

import random

import numpy as np
import pytest

from launcher.data.features import collate
from launcher.data.stream import Shards, batch_order_rng, batches_in_epoch, chunk_batches, features


def _chunk(lengths: list[int], ner: bool = True) -> dict:
    """Column arrays as Ray Data's numpy batches hold ragged lists: object arrays of arrays."""
    def ragged(rows):
        out = np.empty(len(rows), dtype=object)
        out[:] = [np.asarray(r) for r in rows]
        return out
    ids = [[101] + [1000 + i] * (n - 2) + [102] for i, n in enumerate(lengths)]
    cols = {"input_ids": ragged(ids), "attention_mask": ragged([[1] * n for n in lengths])}
    cols["labels"] = ragged([[-100] + [i % 9] * (n - 2) + [-100] for i, n in enumerate(lengths)]) if ner \
        else np.arange(len(lengths)) % 3
    return cols


def _batches_of_stream(lengths: list[int], batch_size: int, chunk: int, seed: int) -> list[list[int]]:
    """What a worker does over one epoch: chunk the stream, batch each chunk; rows by global index."""
    rng, out = random.Random(seed), []
    for start in range(0, len(lengths), batch_size * chunk):
        part = lengths[start:start + batch_size * chunk]
        out += [[start + i for i in b] for b in chunk_batches(_chunk(part), batch_size, rng)]
    return out


def test_every_row_once_batches_sorted_within_a_chunk_and_counted_ahead():
    lengths = [random.Random(i).randint(3, 60) for i in range(1000)]
    for rows in (0, 1, 15, 16, 17, 1000):
        got = _batches_of_stream(lengths[:rows], 16, 4, seed=3)
        assert len(got) == batches_in_epoch(rows, 16, 4)
        assert sorted(i for b in got for i in b) == list(range(rows))
        assert all(len(b) <= 16 for b in got)
    got = _batches_of_stream(lengths, 16, 4, seed=3)
    for b in got:
        chunk_of = {i // 64 for i in b}
        assert len(chunk_of) == 1  # a batch never mixes chunks: memory stays one chunk
    # within a chunk, batches partition the length order: padding is what a sort would give
    first_chunk = sorted((b for b in got if b[0] < 64), key=lambda b: min(lengths[i] for i in b))
    spans = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in first_chunk]
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))


def test_equal_rows_give_every_rank_the_same_number_of_batches():
    for rows in (0, 5, 64, 65, 1023, 4096):
        counts = {len(_batches_of_stream([10] * rows, 16, 4, seed=s)) for s in range(4)}
        assert counts == {batches_in_epoch(rows, 16, 4)}


def test_same_stream_and_seed_replay_exactly_and_epochs_differ():
    lengths = [random.Random(i).randint(3, 60) for i in range(300)]
    a = _batches_of_stream(lengths, 8, 4, seed=11)
    assert a == _batches_of_stream(lengths, 8, 4, seed=11)  # a resume skipping N batches lands on the same one
    assert a != _batches_of_stream(lengths, 8, 4, seed=12)


def test_features_from_columns_collate_like_the_small_path():
    cols = _chunk([5, 3, 7])
    batch = collate(features(cols, [1, 0, 2]), pad_id=0, with_type_ids=False)
    assert batch["input_ids"].shape == (3, 7)
    assert batch["input_ids"][0].tolist() == [101, 1001, 102, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [-100, 1, -100, -100, -100, -100, -100]
    assert batch["attention_mask"].sum().item() == 15
    cls = _chunk([4, 6], ner=False)
    assert collate(features(cls, [0, 1]), 0, False)["labels"].tolist() == [0, 1]


def test_ranks_order_their_batches_independently():
    """Two ranks with shards of the same length profile: at each step the ranks' batches should not be
    the same length rank (the combined step would be all-short or all-long sentences)."""
    lengths = [5 + i % 40 for i in range(320)]
    orders = [chunk_batches(_chunk(lengths), 16, batch_order_rng(7, 1, rank)) for rank in (0, 1)]
    assert sorted(map(tuple, orders[0])) == sorted(map(tuple, orders[1]))  # the same batches...
    assert orders[0] != orders[1]  # ...in different orders
    # and replays: the same rank, seed and epoch give the same order
    assert chunk_batches(_chunk(lengths), 16, batch_order_rng(7, 1, 0)) == orders[0]


class _FakeStream(Shards):
    """Shards with its Ray Data stream replaced (the one fake): epoch e yields batches e*10 … e*10+4,
    or fails at its first batch when told to."""

    def __init__(self, fail: bool = False):
        self.ahead, self.fail, self.started = None, fail, []

    def _batches(self, epoch: int):
        self.started.append(epoch)
        if self.fail:
            raise RuntimeError("shard:12: bad line")
        yield from range(epoch * 10, epoch * 10 + 5)


def test_prefetched_epoch_yields_what_the_stream_does_and_others_are_untouched():
    shards = _FakeStream()
    shards.prefetch(1)
    assert list(shards.epoch(1)) == [10, 11, 12, 13, 14]
    assert list(shards.epoch(2)) == [20, 21, 22, 23, 24] and shards.started == [1, 2]  # no prefetch: started here
    shards.prefetch(3)
    assert list(shards.epoch(4)) == [40, 41, 42, 43, 44]  # another epoch than prefetched: a stream of its own


def test_prefetch_failure_is_raised_in_the_training_thread():
    shards = _FakeStream(fail=True)
    shards.prefetch(1)
    with pytest.raises(RuntimeError, match="shard:12: bad line"):
        next(shards.epoch(1))


def _pieces_of_ranks(rows_per_rank: int, world: int, piece: int) -> list[int]:
    """The piece sizes every rank's first pass keeps (rows cut every `piece`), in rank order."""
    one = [min(piece, rows_per_rank - at) for at in range(0, rows_per_rank, piece)]
    return one * world


def test_deal_gives_every_rank_the_same_rows_and_every_piece_once_per_epoch():
    from launcher.data.stream import deal

    for rows, world, piece in ((300, 2, 128), (1000, 3, 64), (64, 4, 64), (5, 2, 128)):
        sizes = _pieces_of_ranks(rows, world, piece)
        hands = deal(sizes, world, seed=7, epoch=2)
        assert sorted(i for hand in hands for i in hand) == list(range(len(sizes)))  # each piece once
        assert {sum(sizes[i] for i in hand) for hand in hands} == {rows}  # the same rows on every rank


def test_deal_shuffles_across_ranks_per_epoch_and_replays_exactly():
    from launcher.data.stream import deal

    sizes = _pieces_of_ranks(1000, 2, 16)  # rank 0 kept pieces 0..62, rank 1 pieces 63..125
    first = deal(sizes, 2, seed=7, epoch=2)
    assert first == deal(sizes, 2, seed=7, epoch=2)  # a resume deals the same hands
    assert first != deal(sizes, 2, seed=7, epoch=3) and first != deal(sizes, 2, seed=8, epoch=2)
    mine = set(first[0])
    from_other = len([i for i in mine if i >= len(sizes) // 2])
    assert 0.3 < from_other / len(mine) < 0.7  # rank 0 now trains on about half of what rank 1 read


def test_chunks_have_the_streams_sizes_whatever_the_order_of_pieces():
    from launcher.data.stream import chunks_of

    def piece(start: int, n: int) -> dict:
        return {"where": np.array([f"f:{start + i}" for i in range(n)]), "input_ids": _chunk([5] * n)["input_ids"]}

    pieces = [piece(0, 64), piece(64, 64), piece(128, 20)]
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        chunks = list(chunks_of([pieces[i] for i in order], 50))
        assert [len(c["where"]) for c in chunks] == [50, 50, 48]
        assert sorted(w for c in chunks for w in c["where"]) == sorted(f"f:{i}" for i in range(148))
        assert all(len(c["input_ids"]) == len(c["where"]) for c in chunks)


def test_whole_steps_reads_to_the_end_and_drops_a_partial_accumulation():
    from launcher.data.stream import whole_steps

    read = []

    def stream(n):
        for i in range(n):
            read.append(i)
            yield i

    assert list(whole_steps(stream(7), 3)) == [0, 1, 2, 3, 4, 5] and read == list(range(7))
    assert list(whole_steps(stream(6), 1)) == list(range(6))
    assert list(whole_steps(stream(2), 4)) == []
