"""Which of two metric values is better: the one comparison that early stopping, the progress board,
sweeps, k-fold and the winner all make (a recipe's `train.metric` with its `mode`, "max" or "min")."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def better(mode: str, a: float, b: float | None, delta: float = 0.0) -> bool:
    """Whether `a` beats `b` by more than `delta` under `mode`; any value beats None (no value yet)."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode is 'max' or 'min', not {mode!r}")
    if b is None:
        return True
    return a > b + delta if mode == "max" else a < b - delta


def best(items: Iterable[T], mode: str, key: Callable[[T], float]) -> T:
    """The first item whose key no other item beats (ValueError when there are none)."""
    winner, value = None, None
    for item in items:
        v = key(item)
        if value is None or better(mode, v, value):
            winner, value = item, v
    if value is None:
        raise ValueError("best() of nothing")
    return winner
