"""Reading and labelling the data: the parsers (CoNLL, JSONL, CSV), `Example`, the label set.

The same parsers run in the driver on a sample before Ray starts (`--check`, the label set: a malformed
file fails fast with `file:line`) and in Ray Data tasks over the whole corpus (launcher.data.ingest,
which also tokenizes and splits folds); workers receive features, never raw files.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from launcher.data.sources import Source, expand, read_bytes
from zeroship.errors import EXCERPT_CHARS, DataError, Problem, excerpt, text_problem
from zeroship.tasks import Task

MAX_PROBLEMS = 20  # report this many bad lines, then stop reading


@dataclass
class Example:
    """NER: tokens + tags. Classification: text + label."""

    tokens: list[str] | None = None
    tags: list[str] | None = None
    text: str | None = None
    label: str | None = None
    where: str = ""

    def to_row(self) -> dict[str, Any]:
        """The row Ray Data carries between read, augment and tokenize (the one row schema)."""
        if self.tokens is not None:
            return {"tokens": self.tokens, "tags": self.tags, "where": self.where}
        return {"text": self.text, "label": self.label, "where": self.where}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Example:
        """Back from a row (or one row of a numpy batch: arrays of strings become lists)."""
        if "tokens" in row:
            return cls(tokens=list(row["tokens"]), tags=list(row["tags"]), where=str(row["where"]))
        return cls(text=str(row["text"]), label=str(row["label"]), where=str(row["where"]))

    @classmethod
    def from_batch(cls, batch: dict[str, Any]) -> list[Example]:
        """Every row of a column batch (Ray Data's numpy format)."""
        return [cls.from_row({k: batch[k][i] for k in batch}) for i in range(len(batch["where"]))]


@dataclass
class Split:
    path: str  # as the recipe names it: a file, a folder, a glob or a URI
    examples: list[Example]
    invalid_bio: int = 0  # sequences with an I- that does not continue its entity
    files: list[Source] = field(default_factory=list)
    sampled_bytes: int | None = None  # `launch --check` on a big split: the bytes parsed (see read_sample)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def estimate(self, counted: int) -> int:
        """A count made on the sample, scaled to the whole split by bytes."""
        return round(counted * self.total_bytes / max(1, self.sampled_bytes or self.total_bytes))


@dataclass
class Dataset:
    task: str
    labels: list[str]
    splits: dict[str, Split] = field(default_factory=dict)

    def warnings(self) -> list[str]:
        out = []
        for name, split in self.splits.items():
            if split.invalid_bio:
                out.append(
                    f"{split.path}: {split.invalid_bio} sentence(s){' of the sample' if split.sampled_bytes else ''}"
                    " with invalid BIO (I- without its B-); trained as given"
                )
            if split.sampled_bytes is not None:
                out.append(f"data.{name}: planned from a sample ({split.sampled_bytes / 2**20:.1f} of "
                           f"{split.total_bytes / 2**20:.0f} MB); the workers' stream checks every line as it "
                           "reads it, and a malformed line or a label outside the run's set stops the run there")
        return out


class _Collector:
    """A file's problems, up to MAX_PROBLEMS. Only the first that quotes its line shows an excerpt (a
    file that is not data at all, e.g. /etc/shadow named as train, must not be printed line by line)."""

    def __init__(self, path: str):
        self.path, self.problems, self.quoted = path, [], False

    def add(self, line: int, what: str, fix: str = "", quote: str | None = None) -> None:
        if quote is not None and not self.quoted:
            what, self.quoted = f"{what}: {excerpt(quote)}", True
        self.problems.append(Problem(f"{self.path}:{line}", what, fix))
        if len(self.problems) >= MAX_PROBLEMS:
            self.raise_if_any(truncated=True)

    def raise_if_any(self, truncated: bool = False) -> None:
        if self.problems:
            title = "A data file is invalid." + (f" (first {MAX_PROBLEMS} problems)" if truncated else "")
            raise DataError(self.problems, title=title)


def _read_lines(path: str) -> list[str]:
    return decode_lines(read_bytes(path), path)


def decode_lines(raw: bytes, name: str, first_line: int = 1) -> list[str]:
    """A file's bytes (or a byte range of it that starts a line: `first_line` is that line's number) as
    lines; `name` is what errors call the file."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + first_line
        raise DataError(Problem(f"{name}:{line}", f"not UTF-8 (byte 0x{raw[exc.start]:02x})",
                                "re-encode the file as UTF-8")) from None
    # A BOM is an encoding mark, not part of the first token. Lines end at \n only (with an optional \r):
    # str.splitlines() also breaks at U+2028, NEL and form feed, which would cut a token in two and
    # shift every line number after it.
    lines = (text.removeprefix("\ufeff") if first_line == 1 else text).split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


_COLUMN_SEP = re.compile(r"[ \t]+")  # CoNLL columns: ASCII blanks only, so a token keeps odd Unicode spaces


def read_conll(path: str) -> list[Example]:
    return parse_conll(_read_lines(path), path)


def conll_columns(line: str) -> list[str] | None:
    """A CoNLL line's columns; None for a line that holds no token (blank, or a -DOCSTART- marker)."""
    if not line.strip(" \t") or line.startswith("-DOCSTART-"):
        return None
    return line.split("\t") if "\t" in line else _COLUMN_SEP.split(line.strip(" "))


def parse_conll(lines: list[str], path: str, first_line: int = 1, ncols: int | None = None) -> list[Example]:
    """Columns separated by whitespace or tabs, token first, tag last; blank line between sentences. A byte
    range of a file (launcher.data.ranges) passes its first line's number and the file's column count."""
    out, tokens, tags, start = [], [], [], first_line
    bad = _Collector(path)
    for lineno, line in enumerate(lines + [""], start=first_line):
        if not line.strip(" \t"):
            if tokens:
                out.append(Example(tokens=tokens, tags=tags, where=f"{path}:{start}"))
            tokens, tags = [], []
            continue
        cols = conll_columns(line)
        if cols is None:
            continue
        if not tokens:
            start = lineno
        if len(cols) < 2:
            bad.add(lineno, f"expected 'token ... tag', got {len(cols)} column(s)", quote=line)
            continue
        if ncols is None:
            ncols = len(cols)
        elif len(cols) != ncols:
            bad.add(lineno, f"expected {ncols} columns like the first row, got {len(cols)}")
            continue
        token, tag = cols[0].strip(" "), cols[-1].strip(" ")
        if not token:
            bad.add(lineno, "empty token")
            continue
        if not tag:
            bad.add(lineno, "empty tag")
            continue
        tokens.append(token)
        tags.append(tag)
    bad.raise_if_any()
    return out


def read_jsonl(path: str, task: str) -> list[Example]:
    return parse_jsonl(_read_lines(path), path, task)


def parse_jsonl(lines: list[str], path: str, task: str, first_line: int = 1) -> list[Example]:
    out = []
    bad = _Collector(path)
    labels = _LabelKinds()
    for lineno, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.add(lineno, f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        except RecursionError:
            bad.add(lineno, "invalid JSON: nested too deeply")
            continue
        except ValueError as exc:  # e.g. an integer past Python's digit limit
            bad.add(lineno, f"invalid JSON: {str(exc).split(';')[0]}")
            continue
        if not isinstance(row, dict):
            bad.add(lineno, f"expected a JSON object, got {type(row).__name__}")
            continue
        where = f"{path}:{lineno}"
        if task == Task.TOKEN:
            tokens, tags = row.get("tokens"), row.get("tags")
            if not isinstance(tokens, list) or not isinstance(tags, list):
                bad.add(lineno, 'expected {"tokens": [...], "tags": [...]}')
            elif len(tokens) != len(tags):
                bad.add(lineno, f"{len(tokens)} tokens but {len(tags)} tags")
            elif not tokens:
                bad.add(lineno, "empty sentence")
            elif not all(isinstance(t, str) and t.strip() for t in tokens):
                bad.add(lineno, "every token must be a non-empty string")
            elif not all(isinstance(t, str) and t for t in tags):
                bad.add(lineno, "every tag must be a non-empty string")
            elif (problem := next(filter(None, map(text_problem, tokens + tags)), "")):
                bad.add(lineno, problem, "JSON escapes must form valid UTF-16 pairs")
            else:
                out.append(Example(tokens=tokens, tags=tags, where=where))
        else:
            text, label = row.get("text"), row.get("label")
            if not isinstance(text, str) or label is None or isinstance(label, (dict, list)):
                bad.add(lineno, 'expected {"text": "...", "label": ...}')
            elif (problem := text_problem(text) or (isinstance(label, str) and text_problem(label))):
                bad.add(lineno, problem, "JSON escapes must form valid UTF-16 pairs")
            elif (problem := labels.check(label, lineno)):
                bad.add(lineno, problem, 'labels are strings ("pos") or whole numbers (1), one kind per file')
            else:
                out.append(Example(text=text, label=str(label), where=where))
    bad.raise_if_any()
    return out


class _LabelKinds:
    """JSONL labels are strings or integers, never both in one file: 1 and "1" would merge into one class,
    and 1.0, NaN or true would turn into the labels "1.0", "nan", "True"."""

    def __init__(self):
        self.first: dict[type, int] = {}

    def check(self, label: Any, lineno: int) -> str:
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            shown = "NaN" if isinstance(label, float) and math.isnan(label) else json.dumps(label)[:EXCERPT_CHARS]
            return f"label {shown} is not a string or an integer"
        kind = type(label)
        other = int if kind is str else str
        if other in self.first:
            names = {str: "a string", int: "an integer"}
            return (f"label {json.dumps(label)[:EXCERPT_CHARS]} is {names[kind]} but line {self.first[other]} "
                    f"has {names[other]} label")
        self.first.setdefault(kind, lineno)
        return ""


def read_csv(path: str, text_column: str, label_column: str, delimiter: str) -> list[Example]:
    return parse_csv(_read_lines(path), path, text_column, label_column, delimiter)


def parse_csv(lines: list[str], path: str, text_column: str, label_column: str, delimiter: str,
              shift: int = 0) -> list[Example]:
    """Each file (each shard) starts with its own header row. A byte range of a file after its first
    (launcher.data.ranges) comes with the file's header put before it, and `shift` lines to add to the
    reader's line numbers."""
    bad = _Collector(path)
    if not lines:
        raise DataError(Problem(path, "empty file", "the first row must be a header"))
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise DataError(Problem(f"{path}:1", f"unreadable CSV header: {exc}")) from None
    missing = [c for c in (text_column, label_column) if c not in header]
    if missing:
        raise DataError(
            Problem(
                f"{path}:1",
                f"header has no column {', '.join(map(excerpt, missing))}",
                f"header starts {excerpt(delimiter.join(header))}; set data.text_column/label_column or data.delimiter",
            )
        )
    ti, li = header.index(text_column), header.index(label_column)
    out = []
    for row in _csv_rows(reader, bad, shift):
        if not row:
            continue
        if len(row) != len(header):
            bad.add(reader.line_num + shift, f"expected {len(header)} columns, got {len(row)}")
            continue
        if not row[li].strip():
            bad.add(reader.line_num + shift, "empty label")
            continue
        out.append(Example(text=row[ti], label=row[li].strip(), where=f"{path}:{reader.line_num + shift}"))
    bad.raise_if_any()
    return out


def _csv_rows(reader, bad: _Collector, shift: int = 0):
    """The reader's rows; a row the csv module refuses (a field over its size limit, a stray quote at the
    end of the file) is reported with its line and reading goes on after it."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            bad.add(reader.line_num + shift, f"unreadable CSV row: {exc}",
                    "quote fields that hold the delimiter or a newline; keep each field under 128 KiB")


def count_invalid_bio(tags: list[str]) -> bool:
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            return True
        prev = tag
    return False


def infer_labels(task: str, examples: list[Example]) -> list[str]:
    if task == Task.TOKEN:
        return label_order(task, {t for ex in examples for t in ex.tags})
    return label_order(task, {ex.label for ex in examples})


def label_order(task: str, seen: set[str]) -> list[str]:
    """The label set in its id order: NER puts O first, and has I-X wherever it has B-X (a word's later
    sub-tokens are I-X with data.label_all_tokens, even where no entity in the data spans two words)."""
    if task != Task.TOKEN:
        return sorted(seen)
    return ["O"] + sorted((seen | {f"I-{t[2:]}" for t in seen if t.startswith("B-")}) - {"O"})


def _check_bio_label(tag: str, where: str, bad: _Collector) -> None:
    if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
        bad.problems.append(Problem(where, f"tag {excerpt(tag)} is not BIO (O, B-TYPE, I-TYPE)"))


def parse_file(name: str, data: dict, task: str) -> list[Example]:
    """One file (or shard) of a split, in the recipe's format."""
    return parse_lines(decode_lines(read_bytes(name), name), name, data, task)


def parse_lines(lines: list[str], name: str, data: dict, task: str, first_line: int = 1, ncols: int | None = None,
                header: str | None = None) -> list[Example]:
    """A file's lines, or a byte range's (launcher.data.ranges): the number of its first line, the file's CoNLL
    column count, and for a CSV range after the first the file's header row."""
    if data["format"] == "conll":
        return parse_conll(lines, name, first_line, ncols)
    if data["format"] == "jsonl":
        return parse_jsonl(lines, name, task, first_line)
    if header is not None:  # the header goes first, so the reader's line numbers shift by one more
        lines, first_line = [header, *lines], first_line - 1
    return parse_csv(lines, name, data["text_column"], data["label_column"], data["delimiter"], shift=first_line - 1)


# `launch --check` parses a split whole up to this size; above it, SAMPLE_BYTES spread over SAMPLE_FILES
# of its files (the head of each, cut at a record boundary), and the counts it prints are estimates.
CHECK_FULL_BYTES = 16 * 2**20
SAMPLE_BYTES = 8 * 2**20
# A launch plans from at most this much of the train split (its sample: labels, counts, augmentation
# pools); Ray Data tasks read and check all of it (launcher.data.ingest), so the driver's memory stays flat.
LAUNCH_TRAIN_BYTES = 2**20
SAMPLE_FILES = 8


def read_sample(files: list[Source], data: dict, task: str, budget: int = SAMPLE_BYTES) -> tuple[list[Example], int]:
    """Examples from the heads of up to SAMPLE_FILES files spread over the list, and the bytes read."""
    k = min(len(files), SAMPLE_FILES)
    picked = [files[round(i * (len(files) - 1) / max(1, k - 1))] for i in range(k)]
    examples, covered = [], 0
    for f in picked:
        raw = read_bytes(f.name, limit=budget // k)
        if len(raw) < f.size:
            raw = _whole_records(raw, data)
        covered += len(raw)
        examples += parse_lines(decode_lines(raw, f.name), f.name, data, task)
    return examples, covered


def _whole_records(raw: bytes, data: dict) -> bytes:
    """The head of a file cut after its last complete record: a sentence (CoNLL, ends at a blank line),
    a line (JSONL) or a row (CSV: a newline outside quotes)."""
    if data["format"] == "conll":
        cut = max(raw.rfind(b"\n\n"), raw.rfind(b"\n\r\n"))
        return raw[:cut + 1] if cut >= 0 else b""
    cut = raw.rfind(b"\n")
    if data["format"] == "csv":
        while cut >= 0 and raw.count(b'"', 0, cut) % 2:
            cut = raw.rfind(b"\n", 0, cut)
    return raw[:cut + 1] if cut >= 0 else b""


def load_dataset(data: dict, task: str, sample: bool | str = False) -> Dataset:
    """Read every split named in the recipe's `data` section and settle the label set.

    `sample`: a split over CHECK_FULL_BYTES is read as a sample (read_sample) for `launch --check` (True);
    for a launch ("train") a train split over LAUNCH_TRAIN_BYTES is read as a sample of that size (the Ray
    Data tasks that stream it check every line, launcher.data.ingest). Then the label set comes
    from the sample unless the recipe gives it,
    and labels are checked against it only where every line was read."""
    splits: dict[str, Split] = {}
    for name in ("train", "validation", "test"):
        path = data.get(name)
        if not path:
            continue
        files = expand(path, f"data.{name}")
        examples, sampled = [], None
        budget = CHECK_FULL_BYTES if sample is True else LAUNCH_TRAIN_BYTES
        if sample in (True, name) and sum(f.size for f in files) > budget:
            examples, sampled = read_sample(files, data, task, SAMPLE_BYTES if sample is True else budget)
        if not examples:  # read whole, also when no record ended inside the sampled heads (records over 1 MB)
            examples, sampled = [ex for f in files for ex in parse_file(f.name, data, task)], None
        if not examples:
            raise DataError(Problem(path, f"the {name} split has no examples"))
        invalid = sum(count_invalid_bio(ex.tags) for ex in examples) if task == Task.TOKEN else 0
        splits[name] = Split(path, examples, invalid, files, sampled)
    labels = data.get("labels") or infer_labels(task, splits["train"].examples)
    partial = splits["train"].sampled_bytes is not None and not data.get("labels")  # labels from a sample
    check_labels(splits, labels, data, task, skip=[name for name in splits if partial and name != "train"])
    return Dataset(task, list(labels), splits)


def check_labels(splits: dict[str, Split], labels: list[str], data: dict, task: str, skip: list[str]) -> None:
    """The label set is BIO (NER) and every label of the splits' examples (but `skip`'s) is in it."""
    closed = set(labels)
    bad = _Collector("")
    if task == Task.TOKEN:
        for tag in labels:
            _check_bio_label(tag, "data.labels", bad)
        if "O" not in closed:
            bad.problems.append(Problem("data.labels", "the BIO label set must contain 'O'"))
    for name, split in splits.items():
        if name in skip:
            continue  # a label the sample missed is not an error
        for ex in split.examples:
            values = ex.tags if task == Task.TOKEN else [ex.label]
            for i, value in enumerate(values):
                if value not in closed:
                    origin = "data.labels in the recipe" if data.get("labels") else "the train split"
                    line = token_line(ex, i) if data["format"] == "conll" else ex.where
                    bad.problems.append(Problem(line, f"label {excerpt(value)} is not in {origin}",
                                                f"known labels: {', '.join(labels[:12])}"))
                    break
            if len(bad.problems) >= MAX_PROBLEMS:
                break
    if task == Task.SEQUENCE and len(labels) < 2:
        bad.problems.append(Problem(splits["train"].path, f"only one label ({labels}) in train"))
    bad.raise_if_any()


def token_line(ex: Example, i: int) -> str:
    """A CoNLL sentence starts at a line and has one token per line, so token i is i lines below."""
    path, _, line = ex.where.rpartition(":")
    return f"{path}:{int(line) + i}"
