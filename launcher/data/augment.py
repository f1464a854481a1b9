"""Training-data augmentation: seeded, label-preserving, on the training split only.

NER (BIO):
- mention replacement: an entity span becomes another mention of the same type seen in training;
- O deletion / O replacement: a token outside every entity is dropped, or becomes another O word;
- case perturbation: a token is lower-, upper- or title-cased (its tag stays).
Classification: random word swap and word deletion.

Each training example gets `copies` augmented copies; every enabled operation acts on a copy with its
own per-token (per-mention) probability, and a copy identical to its original is dropped. Sentences
with invalid BIO are left alone. The counts say how many copies each operation changed.

Each copy draws from its own generator, seeded by train.seed, the example's `where` and the copy number:
the same copies come out whether the driver augments a list (`augment`, the plan's preview) or Ray Data
tasks augment the stream (launcher.data.ingest), in any number of blocks or workers.
"""

from __future__ import annotations

import random
from collections import Counter

from launcher.data.parse import Example, count_invalid_bio
from zeroship.tasks import Task

NER_OPS = ("mention_replacement", "o_deletion", "o_replacement", "case")
CLS_OPS = ("word_swap", "word_deletion")


def spans(tags: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, type) of each entity in a BIO sequence."""
    out, start, kind = [], None, None
    for i, tag in enumerate([*tags, "O"]):
        if start is not None and not (tag.startswith("I-") and tag[2:] == kind):
            out.append((start, i, kind))
            start = None
        if tag.startswith("B-"):
            start, kind = i, tag[2:]
    return out


def valid_bio(tags: list[str]) -> bool:
    return not count_invalid_bio(tags)


def _case(word: str, rng: random.Random) -> str:
    return rng.choice([str.lower, str.upper, str.title])(word)


class Augmenter:
    """Built from the training examples (for the mention and O-word pools), then applied to each."""

    def __init__(self, cfg: dict, train: list[Example], task: str):
        self.cfg, self.task = cfg, task
        self.mentions: dict[str, list[list[str]]] = {}
        self.o_words: list[str] = []
        if task == Task.TOKEN:
            for ex in train:
                for s, e, kind in spans(ex.tags):
                    self.mentions.setdefault(kind, []).append(ex.tokens[s:e])
                self.o_words += [w for w, t in zip(ex.tokens, ex.tags) if t == "O"]

    def copies(self, ex: Example, seed: int) -> list[tuple[Example, list[str]]]:
        """The example's changed copies, each with the operations that changed it."""
        if self.task == Task.TOKEN and not valid_bio(ex.tags):
            return []
        out = []
        for copy in range(self.cfg["copies"]):
            rng = random.Random(f"{seed}:{ex.where}:{copy}")  # str seeds hash the same in every process
            new, used = self.ner(ex, rng) if self.task == Task.TOKEN else self.cls(ex, rng)
            if used:
                out.append((new, used))
        return out

    def ner(self, ex: Example, rng: random.Random) -> tuple[Example, list[str]]:
        cfg = self.cfg
        tokens, tags, used = list(ex.tokens), list(ex.tags), []
        if cfg["mention_replacement"]:
            new_tokens, new_tags, pos, changed = [], [], 0, False
            for s, e, kind in spans(tags):
                new_tokens += tokens[pos:s]
                new_tags += tags[pos:s]
                mention = tokens[s:e]
                if rng.random() < cfg["mention_replacement"] and len(self.mentions.get(kind, [])) > 1:
                    mention = rng.choice(self.mentions[kind])
                    changed |= mention != tokens[s:e]
                new_tokens += mention
                new_tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(mention) - 1)
                pos = e
            tokens, tags = new_tokens + tokens[pos:], new_tags + tags[pos:]
            if changed:
                used.append("mention_replacement")
        if cfg["o_replacement"] and self.o_words:
            before = list(tokens)
            tokens = [rng.choice(self.o_words) if t == "O" and rng.random() < cfg["o_replacement"] else w
                      for w, t in zip(tokens, tags)]
            if tokens != before:
                used.append("o_replacement")
        if cfg["o_deletion"]:
            keep = [i for i, t in enumerate(tags)
                    # an O before an I- stays: dropping it would glue that I- to another entity
                    if not (t == "O" and rng.random() < cfg["o_deletion"]
                            and not (i + 1 < len(tags) and tags[i + 1].startswith("I-")))]
            if 0 < len(keep) < len(tags):
                tokens, tags = [tokens[i] for i in keep], [tags[i] for i in keep]
                used.append("o_deletion")
        if cfg["case"]:
            before = list(tokens)
            tokens = [_case(w, rng) if rng.random() < cfg["case"] else w for w in tokens]
            if tokens != before:
                used.append("case")
        return Example(tokens=tokens, tags=tags, where=f"{ex.where} (augmented)"), used

    def cls(self, ex: Example, rng: random.Random) -> tuple[Example, list[str]]:
        cfg = self.cfg
        words, used = ex.text.split(), []
        if cfg["word_swap"] and len(words) > 1:
            before = list(words)
            for i in range(len(words)):
                if rng.random() < cfg["word_swap"]:
                    j = rng.randrange(len(words))
                    words[i], words[j] = words[j], words[i]
            if words != before:
                used.append("word_swap")
        if cfg["word_deletion"]:
            kept = [w for w in words if rng.random() >= cfg["word_deletion"]]
            if 0 < len(kept) < len(words):
                words = kept
                used.append("word_deletion")
        return Example(text=" ".join(words), label=ex.label, where=f"{ex.where} (augmented)"), used


def augment(train: list[Example], task: str, cfg: dict, seed: int) -> tuple[list[Example], dict[str, int]]:
    """The augmented copies of `train` (originals not included) and how many each operation changed."""
    ops = NER_OPS if task == Task.TOKEN else CLS_OPS
    if not any(cfg.get(op) for op in ops):
        return [], {}
    aug = Augmenter(cfg, train, task)
    out, counts = [], Counter()
    for ex in train:
        for new, used in aug.copies(ex, seed):
            out.append(new)
            counts.update(used)
    return out, {"examples": len(out), **{op: counts[op] for op in ops if cfg.get(op)}}
