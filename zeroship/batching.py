"""Length bucketing: the one batcher behind training (launcher.data.features, launcher.data.stream),
evaluation and the bundle's runtime (export.runtime). Items of similar length share a batch, so a batch
pads little; each caller decides only what is sorted together and in which order the batches run."""

from __future__ import annotations

from collections.abc import Sequence


def length_sorted_batches(indices: Sequence[int], lengths: Sequence[int], batch_size: int,
                          pad_slack: int | None = None) -> list[list[int]]:
    """`indices` sorted by `lengths[i]` (stable: equal lengths keep their order in `indices`), cut into
    batches of at most `batch_size`. With `pad_slack`, a batch also ends where the next item would add
    more than that many padding tokens to it (the runtime: latency follows the padded width)."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(indices, key=lengths.__getitem__):
        if current and (len(current) >= batch_size or (
                pad_slack is not None and len(current) * (lengths[i] - lengths[current[-1]]) > pad_slack)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
