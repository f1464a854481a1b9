"""What the workers plan an epoch from, made in the driver before Ray Data reads anything (runs in the driver).

No pass over the corpus comes before the first step: the number of training windows — the learning-rate
schedule's length — is the plan's own. The driver tokenizes what it already holds (the whole train split when
it is small, else the sample `launch` plans from, launcher.data.parse.read_sample) with the workers'
tokenizer, augmentation and k-fold assignment; a sampled split's count is scaled to the split by bytes, as
the plan's other counts are. That count is exact for a split read whole and an estimate otherwise; the
workers make it exact at the end of their first epoch (launcher.worker.train_loop: the schedule is stretched
over the steps that remain, `launcher.worker.engine.Schedule`).

The same figures say whether the tokenized windows are kept after their first pass (`cache`): in Ray's object
store (spilling to disk beyond it) when their estimated size is at most `data.cache_mb`, else streamed again
in every epoch (launcher.data.stream).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from launcher.data.augment import augment
from launcher.data.parse import Dataset, Example
from launcher.recipe.schema import Recipe, tokenizer_source
from zeroship.tasks import Task

# bytes a tokenized window holds per token in Ray Data's blocks and the object store: input ids, attention
# mask, labels, token types and word ids as int64, first-subtoken flags; plus its `where` and tags
TOKEN_BYTES = 5 * 8 + 1
WINDOW_BYTES = 64


@dataclass(frozen=True)
class DataEstimate:
    """Training windows per epoch (exact or estimated), the tokenized data's size, and whether the workers
    keep it after its first pass."""

    train_windows: int
    exact: bool
    train_examples: int
    validation_windows: int
    megabytes: float  # train + validation windows, as the object store would hold them
    cache: bool
    cache_mb: int
    tokenized: bool = True  # False: the driver has no copy of the tokenizer (one window per example assumed)

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The plan's line: how many windows and where they live between passes."""
        approx = "" if self.exact else "≈ "
        size = f"≈ {self.megabytes:,.0f} MB" if self.megabytes >= 10 else f"≈ {self.megabytes:.1f} MB"
        where = (f"tokenized once, kept in Ray's object store after the first pass ({size} ≤ data.cache_mb "
                 f"{self.cache_mb})" if self.cache else
                 f"streamed and tokenized again every epoch ({size} > data.cache_mb {self.cache_mb})")
        guess = "" if self.tokenized else " (no tokenizer here: one window per example until the workers count)"
        return f"{approx}{self.train_windows:,} training windows per epoch{guess}; {where}"


def driver_tokenizer(source: str, max_length: int, stride: int):
    """The workers' tokenizer from its tokenizer.json, in a local folder or the Hugging Face cache, through
    `tokenizers` alone (the driver imports no torch); None when the driver has no copy (a hub model the
    nodes download when the run starts)."""
    import tokenizers
    from huggingface_hub import try_to_load_from_cache

    from launcher.data.features import backend

    path = os.path.join(source, "tokenizer.json")
    if not os.path.isfile(path):
        cached = try_to_load_from_cache(source, "tokenizer.json") if not os.path.isdir(source) else None
        if not isinstance(cached, str):
            return None
        path = cached
    return backend(tokenizers.Tokenizer.from_file(path), max_length, stride)


def count_windows(recipe: Recipe, examples: list[Example], labels: list[str],
                  label_all: bool = False) -> tuple[int, int] | None:
    """(windows, tokens) of `examples` with the workers' tokenizer and window settings; None without it."""
    from launcher.data.features import encode_cls, encode_ner

    ner, d = recipe.model.task == Task.TOKEN, recipe.data
    tokenizer = driver_tokenizer(tokenizer_source(recipe.model), d.max_length, d.stride if ner else 0)
    if tokenizer is None:
        return None
    if not examples:
        return 0, 0
    label2id = {label: i for i, label in enumerate(labels)}
    known = [ex for ex in examples if (ex.tags is None or set(ex.tags) <= label2id.keys()) and
             (ex.label is None or ex.label in label2id)]  # a label outside the set is the stream's error to raise
    feats = (encode_ner(tokenizer, known, label2id, d.max_length, d.stride, False, label_all) if ner
             else encode_cls(tokenizer, known, label2id, d.max_length))
    scale = len(examples) / max(1, len(known))
    return round(len(feats) * scale), round(sum(len(f.input_ids) for f in feats) * scale)


def estimate(recipe: Recipe, dataset: Dataset, fold: tuple[int, int] | None = None) -> DataEstimate:
    """The run's (or one k-fold trial's: `fold` = (k, f)) training windows per epoch and the cache decision."""
    from launcher.data.ingest import fold_of

    split, d = dataset.splits["train"], recipe.data
    examples, validation = list(split.examples), list(dataset.splits["validation"].examples)
    copies, _ = augment(examples, recipe.model.task, d.augmentation.model_dump(), recipe.train.seed)
    rows = examples + copies  # as the stream makes them (launcher.data.ingest.build_datasets)
    if fold is not None:  # k-fold: the rows whose `where` hashes to the fold validate, the others train
        k, f = fold
        validation = [ex for ex in rows if fold_of(ex.where, k) == f]
        rows = [ex for ex in rows if fold_of(ex.where, k) != f]
        examples = [ex for ex in examples if fold_of(ex.where, k) != f]
    counted = count_windows(recipe, rows, dataset.labels, d.label_all_tokens)
    tokenized = counted is not None
    exact = split.sampled_bytes is None and tokenized
    if counted is None:  # no tokenizer here: a window per example, each half of max_length (the workers count)
        counted = (len(rows), len(rows) * d.max_length // 2)
    windows, tokens = counted
    val_windows, val_tokens = count_windows(recipe, validation, dataset.labels) or (
        len(validation), len(validation) * d.max_length // 2)
    if split.sampled_bytes is not None:
        windows, tokens = split.estimate(windows), split.estimate(tokens)
        if fold is not None:
            val_windows, val_tokens = split.estimate(val_windows), split.estimate(val_tokens)
    megabytes = ((tokens + val_tokens) * TOKEN_BYTES + (windows + val_windows) * WINDOW_BYTES) / 2**20
    return DataEstimate(max(1, windows), exact, split.estimate(len(examples)),
                        val_windows, round(megabytes, 1), d.cache_mb > 0 and megabytes <= d.cache_mb, d.cache_mb,
                        tokenized)
