"""Casing classes: what an uncased tokenizer throws away, given back to the model as token types.

An uncased encoder's tokenizer (the packaged MiniLM's, like bert-base-uncased's) lowercases its input,
so "Apple" and "apple" reach the model as the same ids, and capitals carry much of what NER looks at.
With `model.casing: true` each token's type id is the casing class of its own characters in the
original text, fed through the encoder's token-type embeddings (grown to CLASSES rows, each new row
starting as the pretrained row 0, launcher.nn.model.enable_casing). The training data, the driver's
evaluation, the exporter and the ONNX bundle's runtime all compute them here, so they agree.

Dependency-free on purpose: the bundle's runtime (export/runtime.py) imports it without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# 0 is also special tokens and padding: it is the pretrained type-0 row, so a text without cased
# letters looks to the model exactly as it did before training.
NAMES = ("none", "lower", "title", "upper", "mixed")
NONE, LOWER, TITLE, UPPER, MIXED = range(len(NAMES))
CLASSES = len(NAMES)


def casing_class(piece: str) -> int:
    """none: no cased letter (digits, punctuation); lower; title: the first cased letter upper
    ("Okafor", "I", "McDonald"); upper: every cased letter upper, two or more ("NATO"); mixed: the
    first lower and another upper ("iPhone")."""
    cased = [c for c in piece if c.lower() != c.upper()]
    if not cased:
        return NONE
    if all(c.islower() for c in cased):
        return LOWER
    if len(cased) > 1 and all(c.isupper() for c in cased):
        return UPPER
    return TITLE if cased[0].isupper() else MIXED


def casing_ids(word_ids: Sequence[int | None], offsets: Sequence[tuple[int, int]],
               source: Callable[[int | None], str]) -> list[int]:
    """Per token, the class of the characters it was cut from: `source(word_id)` is the text its
    offsets index (the word for pre-split input, the whole text otherwise). Special tokens: NONE."""
    out = []
    for wid, (start, end) in zip(word_ids, offsets):
        out.append(NONE if wid is None or end <= start else casing_class(source(wid)[start:end]))
    return out


def casing_ids_in_text(word_ids: Sequence[int | None], offsets: Sequence[tuple[int, int]], text: str) -> list[int]:
    """casing_ids of a text encoded whole (offsets index the text itself)."""
    return casing_ids(word_ids, offsets, lambda _: text)
