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


class CountedFeeds(list):
    """Calibration feeds that count how often the quantizer reads them through."""

    passes = 0

    def __iter__(self):
        def read():  # counted when the first feed is taken, not when an iterator is made
            self.passes += 1
            yield from list.__iter__(self)

        return read()


def two_matmul_graph(path) -> None:
    """x[B, 8] → MatMul → Relu → MatMul → logits[B, 4]: two constant-B MatMuls for static int8."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w1, w2 = (numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in
              (("w1", (8, 8)), ("w2", (8, 4))))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["logits"], name="second")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def static_builder(src, folder, calibration):
    from export.quantize import Int8Builder

    folder.mkdir()
    x = np.random.default_rng(5).normal(size=(6, 8)).astype(np.float32)
    return Int8Builder(src, folder, evaluate=lambda p: ({}, 0.0), sample=[({"x": x}, np.ones(6, dtype=bool))],
                       calibration=calibration, serve_feeds=lambda independent: [], budget=0.5, log=lambda m: None)


def test_static_ranking_calibrates_once_and_builds_what_a_fresh_calibration_builds(tmp_path):
    """The sensitivity ranking quantizes every node alone: the activation ranges are computed on the first
    of those and read back for the rest (onnxruntime's calibration cache), and each candidate is byte for
    byte the model a fresh calibration of the same data builds."""
    src = tmp_path / "model.onnx"
    two_matmul_graph(src)
    feeds = [{"x": np.random.default_rng(i).normal(size=(4, 8)).astype(np.float32)} for i in range(6)]
    cached = static_builder(src, tmp_path / "work", CountedFeeds(feeds))
    ranked = cached.sensitivity("static")
    assert sorted(s["node"] for s in ranked) == ["first", "second"]
    assert all(s["kl"] >= 0 for s in ranked)
    assert cached.calibration.passes == 1  # two candidates, one pass over the calibration data
    cached.quantize("static", tmp_path / "plain.onnx")
    cached.quantize("static", tmp_path / "second.onnx", only=["second"])
    assert cached.calibration.passes == 1
    for name, only in (("plain", None), ("second", ["second"])):
        fresh = static_builder(src, tmp_path / f"fresh-{name}", CountedFeeds(feeds))
        fresh.quantize("static", tmp_path / f"fresh-{name}.onnx", only=only)
        assert fresh.calibration.passes == 1
        assert (tmp_path / f"fresh-{name}.onnx").read_bytes() == (tmp_path / f"{name}.onnx").read_bytes()
    # the cache lives in the builder's work folder, which the export removes with its candidates
    assert cached.calibration_cache.parent == tmp_path / "work" and cached.calibration_cache.is_file()
