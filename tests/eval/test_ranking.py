"""launcher.eval.ranking: the one comparison of metric values."""

from __future__ import annotations

import pytest

from launcher.eval.ranking import best, better


def test_better_follows_the_mode_and_the_delta():
    assert better("max", 0.9, 0.8) and not better("max", 0.8, 0.9) and not better("max", 0.8, 0.8)
    assert better("min", 0.1, 0.2) and not better("min", 0.2, 0.1)
    assert not better("max", 0.805, 0.8, delta=0.01) and better("max", 0.82, 0.8, delta=0.01)
    assert not better("min", 0.195, 0.2, delta=0.01) and better("min", 0.18, 0.2, delta=0.01)
    assert better("max", -1e9, None) and better("min", 1e9, None)
    with pytest.raises(ValueError, match="'max' or 'min'"):
        better("maximum", 1, 0)


def test_best_keeps_the_first_of_equal_values():
    rows = [{"n": "a", "f1": 0.5}, {"n": "b", "f1": 0.7}, {"n": "c", "f1": 0.7}, {"n": "d", "f1": 0.6}]
    assert best(rows, "max", lambda r: r["f1"])["n"] == "b"
    assert best(rows, "min", lambda r: r["f1"])["n"] == "a"
    with pytest.raises(ValueError):
        best([], "max", float)
