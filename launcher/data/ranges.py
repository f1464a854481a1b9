"""Byte ranges: a big corpus file parsed by several Ray Data tasks, none of which holds the whole file.

A file over 1 MB (`range_bytes()` / 16) is cut at record boundaries — a line start for JSONL and CSV, the
start of a blank line for CoNLL (sentences end there) — into ranges of `range_bytes()` (16 MB), the first few
smaller (1, 2, 4, 8 MB: the first batch waits only for a small one, `stretches`), each parsed by its own
task (launcher.data.ingest.ParseRange). The driver finds the cuts before Ray Data starts, a stretch of the
file at a time (`scan`): each stretch is read once, its newlines counted and the first boundary at or after
its start found. The counts give each range the number of its first line, so every example keeps its
`file:line`, and the ranges parse to the same examples in the same order as one task reading the whole
file (tests/data/test_ranges.py). A scan reads bytes only (no parsing): on 2 cores, ~0.2 s per 100 MB, so
local files of up to DRIVER_SCAN_BYTES (256 MB) in all are scanned in the driver itself, a 1 MB piece at a
time; bigger ones, and files behind a URI, by one Ray task per stretch, in parallel. On a fresh local Ray
those tasks first waited for worker processes to start: ~2 s where the driver scans a 14 MB file in 0.06 s,
and 6.1 s against 0.6 s for a 200 MB file on 2 cores, before the first step.

CSV rows may hold newlines inside quoted fields, where a line start is no boundary: a CSV file with a line
that has an odd number of quotes is parsed by one task, with a warning. Checks that span a whole file
are kept per range where they can be: the CoNLL column count comes from the file's first rows; JSONL's
"one label kind per file" is checked within each range.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from launcher.data.parse import conll_columns, decode_lines
from launcher.data.sources import Source, is_uri, read_bytes
from zeroship.errors import DataError, Problem

RANGE_BYTES = 16 * 2**20  # a parse task's share of a big file: its memory is a small multiple of this
LOOKAHEAD = 64 * 2**10  # read past a stretch's end in steps of this, to the record that straddles it
HEAD_BYTES = 2**20  # where the CoNLL column count and the CSV header are read from
# local files scanned in the driver, at most this many bytes in all (~0.5 s on 2 cores); beyond it Ray tasks
# scan the stretches in parallel, on every node
DRIVER_SCAN_BYTES = 256 * 2**20
# the driver reads a stretch in pieces of this size (`scan_in_pieces`): reading 16 MB stretches whole, the
# allocator kept what it freed: the driver's peak at 64× CoNLL (200 MB) was 154 MB over the 1× run's
PIECE_BYTES = 2**20


def range_bytes() -> int:
    """The range size: RANGE_BYTES, or ZEROSHIP_RANGE_BYTES (smaller for tests, larger on nodes with memory
    to spare)."""
    raw = os.environ.get("ZEROSHIP_RANGE_BYTES", "")
    if not raw:
        return RANGE_BYTES
    if not raw.isdigit() or int(raw) < 1024:
        raise DataError(Problem("ZEROSHIP_RANGE_BYTES", f"{raw[:20]!r} is not a byte count of at least 1024"))
    return int(raw)


@dataclass(frozen=True)
class Range:
    """Bytes [start, end) of a file (end None: to its end), whose first line is number `line`."""

    name: str
    start: int = 0
    end: int | None = None
    line: int = 1
    ncols: int | None = None  # CoNLL: the column count the file's first row sets
    header: str | None = None  # CSV, ranges after the first: the file's header row

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Range:
        def plain(value: Any) -> Any:  # Ray Data hands back numpy scalars and None-filled columns
            return None if value is None else value.item() if hasattr(value, "item") else value

        return cls(**{k: plain(row[k]) for k in ("name", "start", "end", "line", "ncols", "header")})

    def read_lines(self) -> list[str]:
        limit = None if self.end is None else self.end - self.start
        return decode_lines(read_bytes(self.name, limit=limit, offset=self.start), self.name, self.line)


def boundary(buf: bytes, base: int, start: int, fmt: str, at_eof: bool) -> int | None:
    """The first record start at or after `start` (0 is one), in a file whose bytes from offset `base` are
    `buf` (base ≤ start − 1 when start > 0). None when `buf` ends before it can tell (read more); the file's
    size when there is none before its end."""
    if start == 0:
        return 0
    nl = buf.find(b"\n", start - 1 - base)
    if nl < 0:
        return base + len(buf) if at_eof else None
    p = nl + 1  # an index into buf: the first line start at or after `start`
    while fmt == "conll":  # a sentence may start only after a blank line: cut at the blank line itself
        if p == len(buf):
            return base + p if at_eof else None
        q = buf.find(b"\n", p)
        if q < 0 and not at_eof:
            return None
        line = buf[p:q if q >= 0 else len(buf)]
        if not line.removesuffix(b"\r").strip(b" \t"):
            break
        if q < 0:
            return base + len(buf)  # no blank line before the end
        p = q + 1
    return base + p


def scan(name: str, start: int, stop: int, size: int, fmt: str) -> dict[str, Any]:
    """One stretch [start, stop) of a file: its newline count, the first boundary at or after `start`, the
    newlines before that boundary, and (CSV) whether a line that starts in it has an odd number of quotes."""
    base = max(0, start - 1)
    buf = bytearray(read_bytes(name, limit=stop - base, offset=base))

    def more() -> bool:
        if base + len(buf) >= size:
            return False
        buf.extend(read_bytes(name, limit=LOOKAHEAD, offset=base + len(buf)))
        return True

    while (cut := boundary(buf, base, start, fmt, base + len(buf) >= size)) is None:
        more()
    odd = False
    if fmt == "csv":
        while buf.find(b"\n", stop - 1 - base) < 0 and more():  # to the end of the line that straddles stop
            pass
        end = buf.find(b"\n", max(stop - 1 - base, 0))
        lines = bytes(buf[cut - base:end if end >= 0 else len(buf)]).split(b"\n") if cut < stop else []
        odd = any(line.count(b'"') % 2 for line in lines)
    return {"newlines": buf.count(b"\n", start - base, stop - base), "cut": cut,
            "before_cut": buf.count(b"\n", start - base, cut - base), "odd_quotes": odd}


def scan_in_pieces(name: str, start: int, stop: int, size: int, fmt: str, piece: int = PIECE_BYTES) -> dict[str, Any]:
    """`scan`'s answer for a stretch, from scans of its pieces of `piece` bytes (what the driver holds at a
    time). Newline counts add up; the first piece's scan finds the stretch's cut and the newlines before it
    (reading on to the cut, as `scan` does, when it lies past the piece); a CSV line with odd quotes is seen
    by the piece where it starts."""
    parts = [scan(name, a, min(stop, a + piece), size, fmt) for a in range(start, stop, piece)]
    return {**parts[0], "newlines": sum(p["newlines"] for p in parts),
            "odd_quotes": any(p["odd_quotes"] for p in parts)}


def file_ranges(source: Source, fmt: str, scans: list[dict[str, Any]], size: int) -> list[Range]:
    """A big file's ranges from its stretches' scans (`scan`, in stretch order)."""
    cuts, before = [(0, 1)], 0
    for i, s in enumerate(scans):
        if i:
            cuts.append((s["cut"], 1 + before + s["before_cut"]))
        before += s["newlines"]
    cuts = [c for i, c in enumerate(cuts) if i == 0 or (c[0] > cuts[i - 1][0] and c[0] < size)]
    head = read_bytes(source.name, limit=HEAD_BYTES)
    lines = decode_lines(head[:head.rfind(b"\n") + 1], source.name)
    ncols = header = None
    if fmt == "conll":
        ncols = next((len(c) for c in map(conll_columns, lines) if c is not None and len(c) >= 2), None)
    elif fmt == "csv" and lines:
        header = lines[0]
    return [Range(source.name, start, cuts[i + 1][0] if i + 1 < len(cuts) else None, line, ncols,
                  header if i else None)
            for i, (start, line) in enumerate(cuts)]


RAMP = 4  # a big file's first stretches are limit/2**RAMP, …, limit/2 bytes (stretches)


def stretches(size: int, limit: int) -> list[tuple[int, int]]:
    """[start, stop) of a big file's stretches: `limit` bytes each, but the first ones ramp up from
    limit / 2**RAMP, doubling. A range's examples leave its task only when it has parsed all of them, and
    the first batch waits for the first range (preserve_order): a 1 MB first range gives a 200 MB file its
    first batch about as soon as a small file's, while later ranges parse beside the training."""
    out, start = [], 0
    for i in range(RAMP + 1):
        if start >= size:
            break
        stop = min(size, start + max(1, limit >> (RAMP - i)))
        out.append((start, stop))
        start = stop
    out += [(s, min(size, s + limit)) for s in range(start, size, limit)]
    return out


SCANNED: dict[tuple, list[Range]] = {}  # a driver scans a file once (each split's dataset, k-fold's count)


def plan_ranges(files: list[Source], fmt: str, num_cpus: float, size_limit: int | None = None,
                driver_bytes: int | None = None) -> tuple[list[Range], list[str]]:
    """Every file of a split as ranges, in order: files up to 1 MB whole, bigger ones cut (scanned here when
    they are local and at most `driver_bytes` in all, else by Ray tasks). Also a warning for each CSV file
    scanned now that must be parsed whole."""
    limit = size_limit or range_bytes()
    cut = max(1, limit >> RAMP)  # a file over the first stretch is cut: its first batch waits for that alone
    todo = [f for f in files if f.size > cut and (f.name, f.size, fmt, limit) not in SCANNED]
    budget = DRIVER_SCAN_BYTES if driver_bytes is None else driver_bytes
    here = not any(is_uri(f.name) for f in todo) and sum(f.size for f in todo) <= budget
    if here:
        found = {f.name: [scan_in_pieces(f.name, start, stop, f.size, fmt) for start, stop in stretches(f.size, limit)]
                 for f in todo}
    else:
        import ray

        found = {name: ray.get(refs) for name, refs in _scan_tasks(todo, fmt, limit, num_cpus).items()}
    warnings = []
    for f in todo:
        scans = found[f.name]
        if fmt == "csv" and any(s["odd_quotes"] for s in scans):
            SCANNED[f.name, f.size, fmt, limit] = [Range(f.name)]
            warnings.append(f"{f.name}: a CSV row holds a newline inside quotes, so the file cannot be cut at "
                            "line starts and one task parses all of it (one row per line, or shards, parse in "
                            "parallel)")
        else:
            SCANNED[f.name, f.size, fmt, limit] = file_ranges(f, fmt, scans, f.size)
    ranges = [r for f in files for r in (SCANNED[f.name, f.size, fmt, limit] if f.size > cut else [Range(f.name)])]
    return ranges, warnings


def _scan_tasks(files: list[Source], fmt: str, limit: int, num_cpus: float) -> dict[str, list]:
    """One Ray task per stretch of every file, all started at once: {file: [scan result refs]}."""
    import ray

    task = ray.remote(num_cpus=num_cpus)(scan)
    return {f.name: [task.remote(f.name, start, stop, f.size, fmt) for start, stop in stretches(f.size, limit)]
            for f in files}
