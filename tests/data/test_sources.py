"""A split as a folder of shards, a glob or a URI: which files are read, in what order, and how a bad
one is reported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import TOY_CLS, TOY_NER, cli, toy_ner_shards

from launcher.data.parse import load_dataset, read_conll, read_csv
from launcher.data.sources import describe, expand
from launcher.recipe.schema import load_recipe
from zeroship.errors import DataError

TOY = read_conll(str(TOY_NER / "train.conll"))


def _data(train: str, fmt: str = "conll", **kw) -> dict:
    validation = str(TOY_NER / "validation.conll") if fmt == "conll" else str(Path(train).parent / "val")
    return {"format": fmt, "train": train, "validation": validation, "test": None, "labels": None, **kw}


def _pairs(examples) -> list[tuple[list[str], list[str]]]:
    return [(ex.tokens, ex.tags) for ex in examples]


@pytest.mark.parametrize("fmt", ["conll", "jsonl"])
def test_a_folder_of_shards_reads_like_the_one_file_in_name_order(tmp_path, fmt):
    folder = toy_ner_shards(tmp_path / "shards", fmt, 3)
    toy_ner_shards(tmp_path / "val", fmt, 1, "validation")
    (folder / "sub").mkdir()  # a subfolder is not a shard (and its files are not read)
    (folder / "sub" / "x.conll").write_text("not read\n")
    os.mkfifo(folder / "pipe")  # opening a FIFO would block the reader: it is skipped, never opened
    ds = load_dataset(_data(str(folder), fmt), "token_classification")
    train = ds.splits["train"]
    assert _pairs(train.examples) == _pairs(TOY) and len(TOY) > 100
    assert [Path(f.name).name for f in train.files] == ["part-0000." + fmt, "part-0001." + fmt, "part-0002." + fmt]
    assert sum(f.size for f in train.files) == sum((folder / f"part-{i:04d}.{fmt}").stat().st_size for i in range(3))
    # every example still says which shard and line it came from
    second = train.examples[len(TOY) // 3]
    assert second.where.startswith(str(folder / "part-0001.")) and second.where.endswith(":1")


def test_globs_and_file_uris_name_the_same_files(tmp_path):
    folder = toy_ner_shards(tmp_path / "shards", "jsonl", 3)
    (folder / "notes.txt").write_text("not a shard")
    expected = [str(folder / f"part-{i:04d}.jsonl") for i in range(3)]
    assert [f.name for f in expand(str(folder / "part-*.jsonl"), "data.train")] == expected
    assert [f.name for f in expand(str(tmp_path / "**" / "part-000[12].jsonl"), "data.train")] == expected[1:]
    uri = f"file://{folder}"
    assert [f.name for f in expand(uri + "/part-*.jsonl", "data.train")] == ["file://" + e for e in expected]
    assert len(expand(uri, "data.train")) == 4  # the folder: every visible file, notes.txt too
    toy_ner_shards(tmp_path / "val", "jsonl", 1, "validation")
    ds = load_dataset(_data(uri + "/part-*.jsonl", "jsonl", validation=f"file://{tmp_path / 'val'}"),
                      "token_classification")
    assert _pairs(ds.splits["train"].examples) == _pairs(TOY)
    assert describe(ds.splits["train"].files).startswith("3 files, ")


def test_a_literal_path_with_glob_characters_is_read_as_it_is(tmp_path):
    literal = tmp_path / "train[1].csv"
    literal.write_bytes((TOY_CLS / "train.csv").read_bytes())
    (tmp_path / "train1.csv").write_text("text,label\nwould,be matched by the glob\n")
    files = expand(str(literal), "data.train")
    assert [f.name for f in files] == [str(literal)]


def test_csv_shards_each_have_their_header(tmp_path):
    lines = (TOY_CLS / "train.csv").read_text().splitlines(keepends=True)
    half = len(lines) // 2
    (tmp_path / "a.csv").write_text("".join(lines[:half]))
    (tmp_path / "b.csv").write_text(lines[0] + "".join(lines[half:]))
    data = _data(str(tmp_path / "*.csv"), "csv", validation=str(TOY_CLS / "validation.csv"), text_column="text",
                 label_column="label", delimiter=",")
    got = load_dataset(data, "sequence_classification").splits["train"].examples
    whole = read_csv(str(TOY_CLS / "train.csv"), "text", "label", ",")
    assert [(e.text, e.label) for e in got] == [(e.text, e.label) for e in whole]


def test_a_bad_line_in_one_shard_is_reported_with_that_shard_and_line(tmp_path):
    folder = toy_ner_shards(tmp_path / "shards", "conll", 2)
    bad = folder / "part-0001.conll"
    lines = bad.read_text().splitlines()
    lines[4] = "token_without_a_tag"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_dataset(_data(str(folder)), "token_classification")
    assert f"{bad}:5: expected 'token ... tag'" in str(err.value)


@pytest.mark.parametrize("spec, what", [
    ("empty", "no data files there"),
    ("only-hidden", "no data files there"),
    ("*.nothing", "no file matches"),
    ("missing.conll", "file not found"),
    ("file:///nonexistent-zeroship/x.conll", "not found"),
    ("file:///nonexistent-zeroship/*.conll", "not found"),
    ("file:///tmp/*/x.conll", "a glob in its last part only"),
])
def test_a_split_with_no_files_is_a_clear_error(tmp_path, spec, what):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only-hidden").mkdir()
    (tmp_path / "only-hidden" / ".x.conll").write_text("A O\n")
    (tmp_path / "only-hidden" / "_SUCCESS").write_text("")
    target = spec if "://" in spec else str(tmp_path / spec)
    with pytest.raises(DataError) as err:
        expand(target, "data.train")
    assert what in str(err.value) and "data.train" in str(err.value)


def test_recipe_paths_resolve_relative_to_the_recipe_but_uris_stay(tmp_path):
    toy_ner_shards(tmp_path / "data" / "shards", "conll", 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {encoder: packaged:all-MiniLM-L6-v2, task: token_classification}\n"
                      "data: {format: conll, train: data/shards/part-*.conll, "
                      f"validation: 'file://{TOY_NER / 'validation.conll'}'}}\n")
    resolved = load_recipe(recipe).as_dict()
    assert resolved["data"]["train"] == str(tmp_path / "data" / "shards" / "part-*.conll")
    assert resolved["data"]["validation"] == f"file://{TOY_NER / 'validation.conll'}"
    ds = load_dataset(resolved["data"], "token_classification")
    assert len(ds.splits["train"].files) == 2 and len(ds.splits["validation"].examples) > 0


def test_check_lists_every_missing_split_at_once_and_exits_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {encoder: packaged:all-MiniLM-L6-v2, task: token_classification}\n"
                      "data: {format: conll, train: 'shards/*.conll', validation: empty/}\n")
    (tmp_path / "empty").mkdir()
    res = cli("launch", "--check", str(recipe), timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    err = " ".join(res.stderr.split())
    assert "data.train: no file matches" in err and "data.validation:" in err and "no data files there" in err


# ------------------------------------------------------------------ launch --check on a big split
def _big_split(folder: Path, shards: int = 6, copies: int = 60) -> Path:
    """`shards` × `copies` × the toy train split (≈ 20 MB, over CHECK_FULL_BYTES); the middle shard ends
    with a malformed line and a sentence tagged B-RARE, both past anything a sample reads."""
    folder.mkdir()
    one = (TOY_NER / "train.conll").read_bytes()
    for s in range(shards):
        tail = b"Odd B-RARE\n\nbroken_line_without_tag\n" if s == shards // 2 else b""
        (folder / f"part-{s}.conll").write_bytes((one + b"\n") * copies + tail)
    return folder


def test_check_samples_a_big_split_and_estimates_its_size(tmp_path):
    from launcher.data import parse as data_mod

    folder = _big_split(tmp_path / "big")
    total = sum(f.stat().st_size for f in folder.iterdir())
    assert total > data_mod.CHECK_FULL_BYTES
    val = tmp_path / "val.conll"
    val.write_text((TOY_NER / "validation.conll").read_text() + "\nRare B-RARE\n")
    spec = _data(str(folder), validation=str(val))
    ds = load_dataset(spec, "token_classification", sample=True)
    train = ds.splits["train"]
    assert train.sampled_bytes is not None and train.sampled_bytes <= data_mod.SAMPLE_BYTES
    true_count = 6 * 60 * len(TOY) + 1
    assert abs(train.estimate(len(train.examples)) - true_count) / true_count < 0.02
    assert "B-RARE" not in ds.labels  # inferred from the sample, and validation's B-RARE is no error
    assert any("planned from a sample" in w for w in ds.warnings())
    assert ds.splits["validation"].sampled_bytes is None  # small splits are read whole
    # the launch reads every line: the malformed one the sample skipped fails it, with its shard and line
    with pytest.raises(DataError) as err:
        load_dataset(spec, "token_classification")
    lines = (folder / "part-3.conll").read_bytes().count(b"\n")
    assert f"{folder / 'part-3.conll'}:{lines}: expected 'token ... tag'" in str(err.value)


def test_a_sample_ends_at_a_whole_record():
    from launcher.data.parse import _whole_records

    csv_head = b'text,label\n"one\ntwo",a\n"three\nfo'
    assert _whole_records(csv_head, {"format": "csv"}) == b'text,label\n"one\ntwo",a\n'
    conll_head = b"A O\nB O\n\nC O\nD"
    assert _whole_records(conll_head, {"format": "conll"}) == b"A O\nB O\n"
    assert _whole_records(b'{"a": 1}\n{"b"', {"format": "jsonl"}) == b'{"a": 1}\n'


def test_check_on_a_big_split_prints_an_estimate(tmp_path):
    _big_split(tmp_path / "big")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {encoder: packaged:all-MiniLM-L6-v2, task: token_classification}\n"
                      f"data: {{format: conll, train: big, validation: '{TOY_NER / 'validation.conll'}'}}\n")
    res = cli("launch", "--check", str(recipe), timeout=300)
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "6 files" in out and "≈" in out and "planned from a sample" in out and "9 in the sample:" in out


def test_check_reads_a_big_split_whole_when_no_record_ends_inside_the_sample(tmp_path):
    """One JSONL record longer than the sampled head of its file: the sample holds no whole record, so
    the check reads the split whole rather than calling it empty."""
    from launcher.data import parse as data_mod

    big = tmp_path / "big.jsonl"
    text = "word " * ((data_mod.CHECK_FULL_BYTES + 2**20) // 5)
    big.write_text(json.dumps({"text": text, "label": "a"}) + "\n" + json.dumps({"text": "short", "label": "b"}) + "\n")
    spec = {"format": "jsonl", "train": str(big), "validation": str(big), "test": None, "labels": None}
    ds = load_dataset(spec, "sequence_classification", sample=True)
    assert ds.splits["train"].sampled_bytes is None and len(ds.splits["train"].examples) == 2
