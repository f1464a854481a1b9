"""Features: examples tokenized for the model, and back.

Tokenization and label alignment (`encode`: the first subtoken of each word carries its label, and
with `label_all` its later subtokens the label's I- form; long sentences become overlapping windows),
stitching window predictions back into words (`merge_word_predictions`), and batching (length-grouped,
dynamically padded by `collate`). Ray Data's tokenization tasks (launcher.data.ingest), the driver's
evaluation and the exporter all use these.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from launcher.data.parse import Example
from zeroship.batching import length_sorted_batches
from zeroship.casing import casing_ids, casing_ids_in_text
from zeroship.tasks import Task


@dataclass
class Feature:
    input_ids: list[int]
    attention_mask: list[int]
    token_type_ids: list[int] | None
    labels: list[int] | int
    example: int  # index of the source example
    word_ids: list[int | None] | None = None  # NER: word index per subtoken
    starts: list[bool] | None = None  # NER: True where a subtoken is its word's first (label carrier)


def backend(tokenizer, max_length: int, stride: int):
    """The Rust `tokenizers.Tokenizer` under a Hugging Face fast tokenizer (or that Tokenizer itself),
    copied and set to cut at `max_length` with `stride` tokens of overlap. Encoding goes through it alone,
    so a process can tokenize without importing transformers (and torch): Ray Data's tasks load the
    model folder's tokenizer.json directly (launcher.data.ingest)."""
    import tokenizers

    base = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else tokenizer.backend_tokenizer
    trunc = base.truncation or {}
    if base.padding is None and trunc.get("max_length") == max_length and trunc.get("stride") == stride:
        return base  # already set (a Ray Data task's cached tokenizer, launcher.data.ingest): no copy per batch
    tok = tokenizers.Tokenizer.from_str(base.to_str())  # a copy: the caller's settings stay as they were
    tok.no_padding()
    tok.enable_truncation(max_length, stride=stride)
    return tok


def continuation_ids(label2id: dict[str, int]) -> dict[int, int]:
    """Label id of a word → the id its later subtokens train on: B-X → I-X (transformers' `b_to_i_label`;
    B-X itself where the set has no I-X), any other label → itself."""
    return {i: label2id.get(f"I-{label[2:]}", i) if label.startswith("B-") else i for label, i in label2id.items()}


def encode_ner(tokenizer, examples: list[Example], label2id: dict[str, int], max_length: int,
               stride: int, casing: bool = False, label_all: bool = False) -> list[Feature]:
    """Tokenize pre-split words; label the first subtoken of each word, -100 elsewhere (`label_all`: the
    later subtokens their word's continuation label instead, `continuation_ids`). Evaluation reads first
    subtokens only (`starts`, merge_word_predictions), so scores are per word either way.

    Sentences longer than max_length become overlapping windows (`stride` subtokens of overlap);
    every window is trained on and `merge_word_predictions` stitches them back for evaluation.
    With `casing`, the token type ids are each token's casing class (zeroship.casing).
    """
    feats: list[Feature] = []
    tok = backend(tokenizer, max_length, stride)
    later = continuation_ids(label2id) if label_all else {}
    for ex_i, first in enumerate(tok.encode_batch([ex.tokens for ex in examples], is_pretokenized=True)):
        tags, words = examples[ex_i].tags, examples[ex_i].tokens
        for enc in [first, *first.overflowing]:  # the sentence's windows, in order
            word_ids = enc.word_ids
            # Offsets are within each word, so a word's first subtoken starts at 0. (A window can begin
            # mid-word; its leading continuation pieces must not carry the word's label.)
            starts = [wid is not None and off[0] == 0 and (i == 0 or word_ids[i - 1] != wid)
                      for i, (wid, off) in enumerate(zip(word_ids, enc.offsets))]
            labels = [-100 if wid is None or tags is None else label2id[tags[wid]] if start
                      else later.get(label2id[tags[wid]], -100) for wid, start in zip(word_ids, starts)]
            types = casing_ids(word_ids, enc.offsets, words.__getitem__) if casing else list(enc.type_ids)
            feats.append(Feature(list(enc.ids), list(enc.attention_mask), types, labels, ex_i, list(word_ids), starts))
    return feats


def encode_cls(tokenizer, examples: list[Example], label2id: dict[str, int], max_length: int,
               casing: bool = False) -> list[Feature]:
    encodings = backend(tokenizer, max_length, 0).encode_batch([ex.text for ex in examples])
    return [Feature(list(enc.ids), list(enc.attention_mask),
                    casing_ids_in_text(enc.word_ids, enc.offsets, ex.text) if casing else list(enc.type_ids),
                    label2id[ex.label] if ex.label is not None else -100, i)
            for i, (enc, ex) in enumerate(zip(encodings, examples))]


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
    chunk = batch_size * 50  # sorted within chunks of 50 batches: shuffled training keeps some randomness
    batches = []
    for start in range(0, len(order), chunk):
        batches += length_sorted_batches(order[start:start + chunk], lengths, batch_size)
    if shuffle:
        rng.shuffle(batches)
    return batches


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
           stride: int, casing: bool = False) -> list[Feature]:
    label2id = {label: i for i, label in enumerate(labels)}
    if task == Task.TOKEN:
        return encode_ner(tokenizer, examples, label2id, max_length, stride, casing)
    return encode_cls(tokenizer, examples, label2id, max_length, casing)
