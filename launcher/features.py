"""Features: examples tokenized for the model, and back.

Tokenization and label alignment (`encode`: first subtoken of each word carries its label, long
sentences become overlapping windows), stitching window predictions back into words
(`merge_word_predictions`), and batching (length-grouped, sharded equally over ranks, dynamically
padded by `collate`). Workers, the driver's evaluation and the exporter all use these.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from launcher.data import Example


@dataclass
class Feature:
    input_ids: list[int]
    attention_mask: list[int]
    token_type_ids: list[int] | None
    labels: list[int] | int
    example: int  # index of the source example
    word_ids: list[int | None] | None = None  # NER: word index per subtoken
    starts: list[bool] | None = None  # NER: True where a subtoken is its word's first (label carrier)


def encode_ner(tokenizer, examples: list[Example], label2id: dict[str, int], max_length: int,
               stride: int) -> list[Feature]:
    """Tokenize pre-split words; label the first subtoken of each word, -100 elsewhere.

    Sentences longer than max_length become overlapping windows (`stride` subtokens of overlap);
    every window is trained on and `merge_word_predictions` stitches them back for evaluation.
    """
    feats: list[Feature] = []
    batch = tokenizer([ex.tokens for ex in examples], is_split_into_words=True, truncation=True,
                      max_length=max_length, stride=stride, return_overflowing_tokens=True,
                      return_offsets_mapping=True)
    mapping = batch["overflow_to_sample_mapping"]
    for w in range(len(batch["input_ids"])):
        ex_i = mapping[w]
        word_ids = batch.word_ids(w)
        tags = examples[ex_i].tags
        # Offsets are within each word, so a word's first subtoken starts at 0. (A window can begin
        # mid-word; its leading continuation pieces must not carry the word's label.)
        starts = [wid is not None and off[0] == 0 and (i == 0 or word_ids[i - 1] != wid)
                  for i, (wid, off) in enumerate(zip(word_ids, batch["offset_mapping"][w]))]
        labels = [label2id[tags[wid]] if start and tags is not None else -100
                  for wid, start in zip(word_ids, starts)]
        feats.append(Feature(batch["input_ids"][w], batch["attention_mask"][w],
                             batch["token_type_ids"][w] if "token_type_ids" in batch else None,
                             labels, ex_i, word_ids, starts))
    return feats


def encode_cls(tokenizer, examples: list[Example], label2id: dict[str, int], max_length: int) -> list[Feature]:
    batch = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length)
    return [
        Feature(batch["input_ids"][i], batch["attention_mask"][i],
                batch["token_type_ids"][i] if "token_type_ids" in batch else None,
                label2id[ex.label] if ex.label is not None else -100, i)
        for i, ex in enumerate(examples)
    ]


def merge_word_predictions(features: list[Feature], window_preds: list[list[int]],
                           n_words: list[int]) -> list[list[int | None]]:
    """Per example and word: the prediction from the window where the word sits most centrally."""
    best: list[list[tuple[int, int] | None]] = [[None] * n for n in n_words]
    for feat, preds in zip(features, window_preds):
        length = len(feat.input_ids)
        for pos, (wid, start) in enumerate(zip(feat.word_ids, feat.starts)):
            if not start:
                continue
            centrality = min(pos, length - 1 - pos)
            slot = best[feat.example][wid]
            if slot is None or centrality > slot[0]:
                best[feat.example][wid] = (centrality, preds[pos])
    return [[s[1] if s else None for s in row] for row in best]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, shuffle: bool) -> list[list[int]]:
    """Batches of similar length (less padding); order shuffled by seed when training."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def shard_batches(batches: list[list[int]], rank: int, world: int) -> tuple[list[list[int]], list[bool]]:
    """Round-robin batches over ranks, padded so every rank runs the same number of steps.

    Collective ops (ZeRO gathers, gradient all-reduce) hang if ranks disagree on the step count.
    Padding batches repeat earlier ones; the flag marks them so evaluation can drop their output.
    """
    n = len(batches)
    total = -(-n // world) * world if n else world
    mine, real = [], []
    for i in range(rank, total, world):
        mine.append(batches[i % n] if n else [])
        real.append(i < n)
    return mine, real


def collate(features: list[Feature], pad_id: int, with_type_ids: bool) -> dict[str, Any]:
    """Pad to the longest in the batch (dynamic padding)."""
    import torch

    width = max(len(f.input_ids) for f in features)
    def pad(seq, value):
        return list(seq) + [value] * (width - len(seq))
    out = {
        "input_ids": torch.tensor([pad(f.input_ids, pad_id) for f in features]),
        "attention_mask": torch.tensor([pad(f.attention_mask, 0) for f in features]),
    }
    if with_type_ids:
        out["token_type_ids"] = torch.tensor([pad(f.token_type_ids or [], 0) for f in features])
    if isinstance(features[0].labels, list):
        out["labels"] = torch.tensor([pad(f.labels, -100) for f in features])
    else:
        out["labels"] = torch.tensor([f.labels for f in features])
    return out


def encode(task: str, tokenizer, examples: list[Example], labels: list[str], max_length: int,
           stride: int) -> list[Feature]:
    label2id = {label: i for i, label in enumerate(labels)}
    if task == "token_classification":
        return encode_ner(tokenizer, examples, label2id, max_length, stride)
    return encode_cls(tokenizer, examples, label2id, max_length)
