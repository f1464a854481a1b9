"""Corpora through Ray Data (the driver builds the pipeline; Ray Data tasks run it): each split is read and
parsed by Ray Data tasks (the same parsers as launcher.data.parse, one file, shard or byte range per task: a
bad line is still `shard:line`), augmented (train; each copy seeded by its example) and tokenized
(launcher.data.features, one tokenizer per task process) as the workers stream their shards
(launcher.data.stream). Nothing reads the corpus before the first step: the schedule's length comes from the
plan (launcher.data.estimate), and a malformed line or a label outside the run's set stops the run when the
stream reaches it, with its `file:line`. The driver never holds the training corpus.

Ray Data's tasks ask for a quarter CPU each: Ray Train keeps the workers' CPUs out of Ray Data's budget,
so a run leaves one CPU beside its workers (plan.DATA_CPUS; a local Ray declares one more than the machine
has); tokenization runs at most one task per CPU Ray Data has (`data_tasks`), since each concurrent task is
a Python process of its own. A file up to 1 MB is one parse task, a bigger one one task per byte range (1, 2,
4, 8, then 16 MB, launcher.data.ranges): no process holds a whole big file, and the first batch waits for a
small range only.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from rich.markup import escape

from launcher.data.augment import CLS_OPS, NER_OPS, Augmenter
from launcher.data.parse import Example, parse_lines, token_line
from launcher.data.ranges import Range, plan_ranges
from launcher.data.sources import expand
from launcher.recipe.schema import Recipe, tokenizer_source
from zeroship.cli import console
from zeroship.errors import DataError, Problem, excerpt
from zeroship.ray_compat import repartition_cpus
from zeroship.tasks import Task

DATA_CPU = 0.25  # what each Ray Data task asks for: the workers hold whole CPUs
BLOCK_EXAMPLES = 1024  # examples per block after parsing, at most: the unit of tokenization tasks and of sharding
BLOCKS_PER_RANK = 8  # blocks per rank, at least, for a small split (block_rows)


class ParseRange:
    """A file, or a byte range of a big one (launcher.data.ranges), → its examples as rows, with the parsers
    of launcher.data.parse (so the same `file:line` problems; a DataError raised here reaches the driver
    through `unwrap`)."""

    def __init__(self, data: dict, task: str):
        self.data, self.task = data, task

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        part = Range.from_row(row)
        examples = parse_lines(part.read_lines(), part.name, self.data, self.task, part.line, part.ncols, part.header)
        return [ex.to_row() for ex in examples]


def unwrap(exc: BaseException) -> BaseException:
    """The innermost user error inside Ray's wrappers (RayTaskError(DataError) is itself a DataError
    subclass, made on the fly, whose text carries a traceback), else `exc`."""
    found, seen = exc, exc
    while seen is not None:
        if isinstance(seen, DataError):
            found = seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return found


def read_split(spec: str, data: dict, task: str, field: str):
    """A split's rows, parsed by Ray Data tasks: one per file, or per byte range of a big file."""
    import ray.data

    # a parser's DataError comes back to the driver as itself (inside RayTaskError), not as a
    # UserCodeException that keeps only its text
    ray.data.DataContext.get_current().raise_original_map_exception = True
    files = expand(spec, field)
    ranges, warnings = plan_ranges(files, data["format"], DATA_CPU)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    ds = ray.data.from_items([r.to_row() for r in ranges], override_num_blocks=len(ranges))
    return ds.flat_map(ParseRange(data, task), num_cpus=DATA_CPU), files


def stable_hash(text: str) -> int:
    """A hash of an example's `where` (file:line) that is the same in every process and run (Python's
    own `hash` of a str is salted per process): k-fold assignment and augmentation seeds use it."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str, max_length: int, stride: int):
    """One tokenizer per Ray worker process (tasks reuse their processes), not one per batch: the model
    folder's tokenizer.json through `tokenizers` alone (transformers, and the torch it imports, would cost
    a fresh process ~7 s on 2 cores); a hub name or a folder without one goes through transformers."""
    import os

    import tokenizers

    from launcher.data.features import backend

    path = os.path.join(source, "tokenizer.json")
    if os.path.isfile(path):
        return backend(tokenizers.Tokenizer.from_file(path), max_length, stride)
    from transformers import AutoTokenizer

    return backend(AutoTokenizer.from_pretrained(source), max_length, stride)


def unknown_label(examples: list[Example], label2id: dict[str, int], conll: bool, listed: bool) -> DataError | None:
    """The first label of `examples` outside the run's label set, as the error that names its line: the
    set comes from data.labels or, for a big train split, from the sample the plan read."""
    for ex in examples:
        values = ex.tags if ex.tags is not None else [ex.label]
        bad = next((i for i, v in enumerate(values) if v is not None and v not in label2id), None)
        if bad is None:
            continue
        where = token_line(ex, bad) if conll and ex.tags is not None else ex.where
        fix = ("add it to data.labels" if listed else
               "list every label in data.labels: without it the label set is inferred from the sample of the "
               "train split the plan reads")
        return DataError(Problem(where, f"label {excerpt(values[bad])} is not in the run's label set "
                                 f"({', '.join(list(label2id)[:12])})", fix))
    return None


def tokenize_batch(batch: dict[str, Any], source: str, task: str, labels: list[str], max_length: int,
                   stride: int, casing: bool = False, label_all: bool = False, conll: bool = False,
                   listed: bool = False) -> dict[str, list]:
    """Examples → features (launcher.data.features: the same alignment and windows as the small path).
    Columns: input_ids, attention_mask, token_type_ids (when the model has them; with `casing`, the tokens'
    casing classes), labels, `where` (the source example), and for NER each window's word ids (-1 for
    none), first-subtoken flags and the sentence's gold tags (evaluation stitches windows back into sentences
    with them)."""
    from launcher.data.features import encode_cls, encode_ner
    from launcher.data.parse import Example

    ner = task == Task.TOKEN
    tokenizer, label2id = (
        _tokenizer(source, max_length, stride if ner else 0),
        {label: i for i, label in enumerate(labels)},
    )
    examples = Example.from_batch(batch)
    error = unknown_label(examples, label2id, conll, listed)
    if error is not None:
        raise error
    if ner:
        feats = encode_ner(tokenizer, examples, label2id, max_length, stride, casing, label_all)
    else:
        feats = encode_cls(tokenizer, examples, label2id, max_length, casing)
    out: dict[str, list] = {"input_ids": [f.input_ids for f in feats],
                            "attention_mask": [f.attention_mask for f in feats],
                            "labels": [f.labels for f in feats],
                            "where": [examples[f.example].where for f in feats]}
    if feats and feats[0].token_type_ids is not None:
        out["token_type_ids"] = [f.token_type_ids for f in feats]
    if task == Task.TOKEN:
        out["word_ids"] = [[-1 if w is None else w for w in f.word_ids] for f in feats]
        out["starts"] = [f.starts for f in feats]
        out["tags"] = [examples[f.example].tags for f in feats]
    return out


def tokenize(ds, source: str, task: str, labels: list[str], max_length: int, stride: int, casing: bool,
             label_all: bool = False, conll: bool = False, listed: bool = False, batch_size: int = 256,
             tasks: int | None = None):
    """The tokenization transform: Ray Data tasks, a batch of examples per call, at most `tasks` at once."""
    import ray.data

    kwargs = dict(source=source, task=task, labels=labels, max_length=max_length, stride=stride, casing=casing,
                  label_all=label_all, conll=conll, listed=listed)
    return ds.map_batches(tokenize_batch, fn_kwargs=kwargs, compute=ray.data.TaskPoolStrategy(size=tasks),
                          batch_size=batch_size, batch_format="numpy", num_cpus=DATA_CPU)


class AugmentRows:
    """A training example's row, then its augmented copies (launcher.data.augment: each copy seeded by the
    example's `where`, so the stream's copies are the plan's preview's). The mention and O-word pools
    come from the examples the driver read: the whole split, or its sample when the split is big."""

    def __init__(self, cfg: dict, pool: list[Example], task: str, seed: int):
        self.augmenter, self.task, self.seed = Augmenter(cfg, pool, task), task, seed

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return [row] + [c.to_row() for c, _ in self.augmenter.copies(Example.from_row(row), self.seed)]


def data_tasks(recipe: Recipe) -> int:
    """How many tokenization tasks run at once: one per CPU Ray Data has (the cluster's CPUs less the
    workers'), at least 2 so that one parses while another tokenizes. Quarter-CPU tasks would otherwise
    start four per CPU, each in a Python process of its own: on a small split, ~2 CPU-s of start-up per
    process for milliseconds of tokenization (8 of them beside a 1-worker run on 2 cores)."""
    import ray

    sc = recipe.scaling
    spare = ray.cluster_resources().get("CPU", 0) - sc.workers * sc.cpus_per_worker
    return max(2, int(spare))


def block_rows(examples: int, world: int) -> int:
    """Examples per block after parsing, and per tokenization task: each task's output goes whole to a rank
    (the one with the fewest rows so far), so at least BLOCKS_PER_RANK of them per rank let every rank's
    share span the corpus (one 1024-row block of a small split would give each rank a contiguous half);
    at most BLOCK_EXAMPLES."""
    return max(16, min(BLOCK_EXAMPLES, examples // max(1, world * BLOCKS_PER_RANK)))


def build_datasets(recipe: Recipe, labels: list[str], pool: list[Example], examples: int) -> dict:
    """The run's train (augmented when the recipe says so) and validation splits as lazy Ray Datasets:
    read, parsed and tokenized by Ray Data tasks as the workers stream their shards (nothing of the corpus
    is held by the driver; the workers keep the windows after their first pass when the plan says so,
    launcher.data.stream). `examples`: the plan's count of training examples (block sizes)."""
    import ray.data

    # blocks in the order of the files and lines, whichever task finishes first: the same shards and
    # batches in every pass and every launch of the recipe (a resumed run replays its epoch exactly)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    task, source, dcfg = recipe.model.task, tokenizer_source(recipe.model), recipe.as_dict()["data"]
    tasks = data_tasks(recipe)
    datasets = {}
    for split in ("train", "validation"):
        rows, _ = read_split(dcfg[split], dcfg, task, f"data.{split}")
        # a range parses into one block: cut it, so that tokenization spreads over tasks and the sentences
        # over the ranks (a block goes whole to one rank); at a quarter CPU per task like the others (Ray's
        # default whole CPU kept it waiting until every range was parsed: 35 s of a 64× CoNLL first step)
        per_block = block_rows(examples, recipe.scaling.workers) if split == "train" else BLOCK_EXAMPLES
        rows = repartition_cpus(rows.repartition(target_num_rows_per_block=per_block), DATA_CPU)
        ops = NER_OPS if task == Task.TOKEN else CLS_OPS
        if split == "train" and any(dcfg["augmentation"].get(op) for op in ops):
            rows = rows.flat_map(AugmentRows(dcfg["augmentation"], pool, task, recipe.train.seed),
                                 num_cpus=DATA_CPU)
        # every sub-token trains with label_all_tokens; validation keeps first sub-tokens, so its loss, like
        # its F1, is per word
        label_all = split == "train" and dcfg["label_all_tokens"]
        # one tokenization task per block: each task's output is a bundle the split hands to one rank whole
        datasets[split] = tokenize(rows, source, task, labels, dcfg["max_length"], dcfg["stride"], recipe.model.casing,
                                   label_all, dcfg["format"] == "conll", bool(dcfg.get("labels")), per_block,
                                   tasks=tasks)
    return datasets


def fold_of(where: str, k: int) -> int:
    """The fold a training example validates in (k-fold): a stable hash of its `where`."""
    return stable_hash(where) % k


def fold_sizes(data: dict, task: str, k: int) -> list[int]:
    """How many training examples each fold holds out (a counting pass in Ray Data tasks)."""
    rows, _ = read_split(data["train"], data, task, "data.train")

    def count(batch: dict[str, Any]) -> dict[str, list]:
        sizes = [0] * k
        for where in batch["where"]:
            sizes[fold_of(str(where), k)] += 1
        return {"sizes": [sizes]}

    parts = rows.map_batches(count, batch_format="numpy", batch_size=None, num_cpus=DATA_CPU).take_all()
    return [sum(int(p["sizes"][f]) for p in parts) for f in range(k)]


def fold_datasets(train, k: int, fold: int) -> dict:
    """k-fold: the training windows whose sentence hashes to `fold` validate, the rest train. A
    sentence's windows share its `where`, so a fold holds whole sentences, the same in every trial."""
    validation = train.filter(lambda row: fold_of(str(row["where"]), k) == fold, num_cpus=DATA_CPU)
    rest = train.filter(lambda row: fold_of(str(row["where"]), k) != fold, num_cpus=DATA_CPU)
    return {"train": rest, "validation": validation}
