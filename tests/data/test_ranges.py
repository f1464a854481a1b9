"""launcher.data.ranges: a big file cut into byte ranges parses to exactly what one task makes of it.

The cuts are found by `scan` (what the driver or the Ray tasks run) and `file_ranges`, called here in process
with tiny range sizes, so that records straddle many cuts; each range is parsed by ingest.ParseRange as a Ray
Data task would. `test_read_split…` runs the real thing: the scan by Ray tasks and by the driver, then
`read_split` on a local Ray, through Ray Data's tasks.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TOY_CLS, TOY_NER

from launcher.data.ingest import ParseRange
from launcher.data.parse import read_conll
from launcher.data.ranges import Range, boundary, file_ranges, scan, scan_in_pieces
from launcher.data.sources import Source
from zeroship.errors import DataError

DATA = {"conll": {"format": "conll"}, "jsonl": {"format": "jsonl"},
        "csv": {"format": "csv", "text_column": "text", "label_column": "label", "delimiter": ","}}
TASK = {"conll": "token_classification", "jsonl": "token_classification", "csv": "sequence_classification"}


def cut(path, fmt: str, limit: int) -> list[Range]:
    """plan_ranges without Ray: the stretches scanned in this process."""
    size = path.stat().st_size
    stretches = [scan(str(path), s, min(size, s + limit), size, fmt) for s in range(0, size, limit)]
    return file_ranges(Source(str(path), size), fmt, stretches, size)


def parsed(parts: list[Range], fmt: str) -> list[dict]:
    parse = ParseRange(DATA[fmt], TASK[fmt])
    return [row for part in parts for row in parse(part.to_row())]


def conll_file(tmp_path, crlf: bool):
    """Toy sentences with a BOM, -DOCSTART- markers, runs of blank lines, blank lines of spaces, a
    sentence far longer than a range, and no newline at the end."""
    sentences = read_conll(str(TOY_NER / "validation.conll"))[:60]
    blocks = ["-DOCSTART- -X- O O\n"]
    for i, ex in enumerate(sentences):
        blocks.append("".join(f"{t} NN {g}\n" for t, g in zip(ex.tokens, ex.tags)))
        if i == 20:
            blocks.append("\n" + "".join(f"w{j} NN O\n" for j in range(400)))  # ~4 KB: spans several ranges
        blocks.append("\n" if i % 7 else " \t\n\n\n-DOCSTART- -X- O O\n\n")
    text = "\ufeff" + "".join(blocks).rstrip("\n")
    path = tmp_path / "big.conll"
    path.write_bytes(text.replace("\n", "\r\n").encode() if crlf else text.encode())
    return path


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("limit", [97, 512, 2048])
def test_conll_ranges_give_the_one_task_examples_in_order(tmp_path, crlf, limit):
    path = conll_file(tmp_path, crlf)
    parts = cut(path, "conll", limit)
    whole = parsed([Range(str(path))], "conll")
    assert len(parts) > 3 and len(whole) == 61
    assert parsed(parts, "conll") == whole  # tokens, tags and file:line, in order
    assert all(p.ncols == 3 for p in parts)


@pytest.mark.parametrize("limit", [64, 700])
def test_jsonl_ranges_with_blank_lines_a_long_line_and_no_final_newline(tmp_path, limit):
    rows = [json.dumps({"tokens": [f"t{i}", "é"], "tags": ["B-X", "O"]}) for i in range(80)]
    rows[30] = json.dumps({"tokens": ["long"] * 300, "tags": ["O"] * 300})
    path = tmp_path / "big.jsonl"
    path.write_bytes(("\ufeff" + "\r\n".join(rows[:40]) + "\n\n  \n" + "\n".join(rows[40:])).encode())
    parts = cut(path, "jsonl", limit)
    whole = parsed([Range(str(path))], "jsonl")
    assert len(parts) > 3 and len(whole) == 80
    assert parsed(parts, "jsonl") == whole


@pytest.mark.parametrize("limit", [50, 333])
def test_csv_ranges_carry_the_header_and_the_line_numbers(tmp_path, limit):
    lines = (TOY_CLS / "train.csv").read_text().splitlines()
    lines[5] = '"quoted, with a comma",science'
    path = tmp_path / "big.csv"
    path.write_bytes(("\ufeff" + "\r\n".join(lines[:120])).encode())
    parts = cut(path, "csv", limit)
    whole = parsed([Range(str(path))], "csv")
    assert len(parts) > 3 and len(whole) == 119
    assert parsed(parts, "csv") == whole
    assert parts[0].header is None and all(p.header == "text,label" for p in parts[1:])


def test_a_csv_newline_inside_quotes_is_seen_by_the_scan(tmp_path):
    path = tmp_path / "quoted.csv"
    path.write_text('text,label\n"first line\nsecond line",a\n' + "plain,b\n" * 40)
    size = path.stat().st_size
    stretches = [scan(str(path), s, min(size, s + 64), size, "csv") for s in range(0, size, 64)]
    assert stretches[0]["odd_quotes"] and not any(s["odd_quotes"] for s in stretches[1:])


def test_a_bad_line_in_a_late_range_is_reported_at_its_line_in_the_file(tmp_path):
    path = conll_file(tmp_path, crlf=True)
    lines = path.read_bytes().split(b"\r\n")
    lines[-5] = b"token-without-a-tag"
    path.write_bytes(b"\r\n".join(lines))
    with pytest.raises(DataError) as one:
        parsed([Range(str(path))], "conll")
    with pytest.raises(DataError) as ranged:
        parsed(cut(path, "conll", 256), "conll")
    assert ranged.value.problems[0].where == one.value.problems[0].where == f"{path}:{len(lines) - 4}"


def _files(tmp_path) -> dict[str, list]:
    """The tests' files per format: long records, CRLF, BOMs, no final newline, a quoted CSV newline."""
    jsonl = tmp_path / "j.jsonl"
    rows = [json.dumps({"tokens": ["long"] * (300 if i == 30 else 2), "tags": ["O"] * (300 if i == 30 else 2)})
            for i in range(80)]
    jsonl.write_bytes(("\ufeff" + "\r\n".join(rows[:40]) + "\n\n  \n" + "\n".join(rows[40:])).encode())
    csv, quoted = tmp_path / "c.csv", tmp_path / "q.csv"
    csv.write_bytes(("\ufeff" + "\r\n".join((TOY_CLS / "train.csv").read_text().splitlines()[:120])).encode())
    quoted.write_text("text,label\n" + "plain,b\n" * 20 + '"first line\nsecond line",a\n' + "plain,b\n" * 20)
    (tmp_path / "lf").mkdir()
    (tmp_path / "crlf").mkdir()
    return {"conll": [conll_file(tmp_path / "lf", False), conll_file(tmp_path / "crlf", True)],
            "jsonl": [jsonl], "csv": [csv, quoted]}


@pytest.mark.parametrize("piece", [1, 7, 64, 300])
def test_a_stretch_scanned_in_pieces_gives_the_whole_stretchs_answer(tmp_path, piece):
    """The driver's scan (`scan_in_pieces`, a piece at a time) against `scan` of the whole stretch (the Ray
    tasks'): the same counts, cut and quote check for every stretch, including cuts that lie pieces or
    stretches past a stretch's start (a record longer than both)."""
    for fmt, paths in _files(tmp_path).items():
        for path in paths:
            size = path.stat().st_size
            for limit in (97, 512, 4096):
                for start in range(0, size, limit):
                    stop = min(size, start + limit)
                    assert scan_in_pieces(str(path), start, stop, size, fmt, piece) == \
                        scan(str(path), start, stop, size, fmt), (path.name, start, stop)


def test_boundary_waits_for_more_bytes_and_stops_at_the_end():
    assert boundary(b"a O\nb O", 0, 2, "conll", at_eof=False) is None  # no blank line yet: read on
    assert boundary(b"a O\nb O", 0, 2, "conll", at_eof=True) == 7  # none before the end: the file's size
    assert boundary(b"a O\n\nb O\n", 10, 12, "conll", at_eof=False) == 14  # the blank line's start
    assert boundary(b'{"a": 1}\n{"b": 2}\n', 0, 3, "jsonl", at_eof=True) == 9
    assert boundary(b"x\ny\n", 0, 2, "jsonl", at_eof=True) == 2  # `start` itself starts a line
    assert boundary(b"whatever", 0, 0, "csv", at_eof=False) == 0


READ_SPLIT = r"""
import json, os, sys
from launcher.data.ingest import read_split
import ray.data
from zeroship.ray_session import init_ray
init_ray()
ray.data.DataContext.get_current().execution_options.preserve_order = True  # as build_datasets sets it
from launcher.data.ranges import SCANNED, plan_ranges
from launcher.data.sources import expand
by_tasks, _ = plan_ranges(expand(sys.argv[1], "data.train"), "conll", 0.25, driver_bytes=0)  # Ray tasks scan
SCANNED.clear()
data = {"format": "conll"}
ds, _ = read_split(sys.argv[1], data, "token_classification", "data.train")  # a small local file: the driver
rows = ds.take_all()
(here,) = SCANNED.values()
print(json.dumps([len(here), here == by_tasks, [[r["where"], list(r["tokens"]), list(r["tags"])] for r in rows]]),
      flush=True)
"""


def test_read_split_parses_a_big_file_in_several_ray_data_tasks(tmp_path, ray_tmp):
    path = conll_file(tmp_path, crlf=True)
    body = path.read_bytes()
    path.write_bytes(body + (b"\r\n\r\n" + body[3:]) * 12)  # ~170 KB, BOM dropped in the copies: 16 KB ranges
    res = subprocess.run([sys.executable, "-c", READ_SPLIT, str(path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env={"PATH": "/usr/bin:/bin", "ZEROSHIP_RAY_TMPDIR": ray_tmp,
                                           "ZEROSHIP_RANGE_BYTES": str(16 * 1024), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranges, same, got = json.loads(res.stdout.strip().splitlines()[-1])
    assert ranges >= 8  # one Ray Data task each
    assert same  # the driver's scan cuts where the Ray tasks' scan does
    want = [[ex.where, ex.tokens, ex.tags] for ex in read_conll(str(path))]
    assert len(want) == 61 * 13 and got == want


def test_the_range_size_setting_is_checked(monkeypatch):
    from launcher.data.ranges import RANGE_BYTES, range_bytes

    monkeypatch.delenv("ZEROSHIP_RANGE_BYTES", raising=False)
    assert range_bytes() == RANGE_BYTES
    monkeypatch.setenv("ZEROSHIP_RANGE_BYTES", "65536")
    assert range_bytes() == 65536
    for bad in ("12", "-5", "1e9", "lots"):
        monkeypatch.setenv("ZEROSHIP_RANGE_BYTES", bad)
        with pytest.raises(DataError, match="ZEROSHIP_RANGE_BYTES.*not a byte count of at least 1024"):
            range_bytes()



@pytest.mark.parametrize(("size", "limit"), [(200 * 2**20, 16 * 2**20), (20 * 2**20, 16 * 2**20), (5000, 1024),
                                             (1025, 1024)])
def test_stretches_cover_the_file_and_ramp_up_to_the_range_size(size, limit):
    from launcher.data.ranges import stretches

    got = stretches(size, limit)
    assert got[0][0] == 0 and got[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))  # contiguous, in order
    widths = [stop - start for start, stop in got]
    assert widths[0] == min(size, limit // 16)  # the first range is small: the first batch waits for it alone
    assert all(w <= limit for w in widths) and widths[:4] == sorted(widths[:4])
