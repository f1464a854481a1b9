"""Hostile input beyond recipes (those are in tests/recipe/broken and test_recipe.py): data files, run folders,
export targets, bundles and checkpoints. Each must end in a clear refusal (exit 2 or the documented error),
never a traceback; nothing zeroship did not write may be deleted; nothing unverified may be unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TOY_NER, cli, plant_payload

from launcher.data.parse import read_conll, read_csv, read_jsonl
from launcher.runs.registry import Registry
from zeroship.errors import DataError, RunError

e2e = pytest.mark.e2e  # the tests that need a trained run (conftest's shared ner_run / ner_bundle)

# ------------------------------------------------------------------ data files


def test_bom_and_unicode_line_separators_do_not_change_tokens_or_line_numbers(tmp_path):
    path = tmp_path / "a.conll"
    # U+2028, NEL and form feed are not line ends in CoNLL; NBSP is not a column separator
    path.write_text("\ufeffEU B-ORG\nrejects\u2028x O\n\nPeter\u00a0Pan B-PER\nsays\x85so O\nhi\x0cthere O\nbad\n",
                    encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_conll(str(path))
    assert f"{path}:7" in str(err.value)  # the bad line keeps its real number
    path.write_text(path.read_text(encoding="utf-8").removesuffix("bad\n"), encoding="utf-8")
    first, second = read_conll(str(path))
    assert first.tokens == ["EU", "rejects\u2028x"] and first.tags == ["B-ORG", "O"]
    assert second.tokens == ["Peter\u00a0Pan", "says\x85so", "hi\x0cthere"] and second.where == f"{path}:4"


def test_bom_in_jsonl_and_csv(tmp_path):
    (tmp_path / "a.jsonl").write_text('\ufeff{"text": "x", "label": "pos"}\n', encoding="utf-8")
    assert read_jsonl(str(tmp_path / "a.jsonl"), "sequence_classification")[0].label == "pos"
    (tmp_path / "a.csv").write_text("\ufefftext,label\nhello,pos\n", encoding="utf-8")
    assert read_csv(str(tmp_path / "a.csv"), "text", "label", ",")[0].text == "hello"


BAD_JSONL = [
    ('{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n', 2, 'label "1" is a string but line 1 has an integer'),
    ('{"text": "a", "label": 1.0}\n', 1, "label 1.0 is not a string or an integer"),
    ('{"text": "a", "label": NaN}\n', 1, "label NaN is not a string or an integer"),
    ('{"text": "a", "label": true}\n', 1, "label true is not a string or an integer"),
    ('{"text": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}\n", 1, "nested too deeply"),
    ('{"text": "a", "label": ' + "9" * 5000 + "}\n", 1, "Exceeds the limit"),
    ('["text", "label"]\n', 1, "expected a JSON object, got list"),
]


@pytest.mark.parametrize("content,line,expected", BAD_JSONL, ids=lambda v: str(v)[:24])
def test_hostile_jsonl_lines_name_file_and_line(tmp_path, content, line, expected):
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_jsonl(str(path), "sequence_classification")
    assert f"{path}:{line}: " in str(err.value) and expected in str(err.value), str(err.value)


def test_csv_field_over_the_csv_modules_limit_is_reported_and_reading_goes_on(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('text,label\nfine,pos\n"' + "a" * 200_000 + '",pos\nalso fine,neg,extra\n')
    with pytest.raises(DataError) as err:
        read_csv(str(path), "text", "label", ",")
    text = str(err.value)
    assert f"{path}:3: unreadable CSV row: field larger than field limit" in text
    assert f"{path}:4: expected 2 columns, got 3" in text  # the rows after it are still checked


def _recipe_with_data(tmp_path: Path, fmt: str, train: str, task: str = "sequence_classification") -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{encoder: packaged:all-MiniLM-L6-v2, task: {task}}}\n"
                      f"data: {{format: {fmt}, train: {train}, validation: {train}}}\n")
    return recipe


@pytest.mark.parametrize("kind", ["folder", "fifo", "dev-null"])
def test_data_path_that_is_not_a_file_exits_2(tmp_path, kind):
    target = {"folder": tmp_path / "d.jsonl", "fifo": tmp_path / "f.jsonl", "dev-null": Path("/dev/null")}[kind]
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    res = cli("launch", "--check", str(_recipe_with_data(tmp_path, "jsonl", str(target))), timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert str(target) in res.stderr


@pytest.mark.parametrize("where", ["recipe", "runs", "data"])
def test_a_path_too_long_for_the_file_system_exits_2(tmp_path, where):
    """ENAMETOOLONG (a name over 255 bytes, a path over 4096) is the user's path, not a bug."""
    long = str(tmp_path / ("n" * 300))
    args = {"recipe": ["launch", "--check", long],
            "runs": ["zeroship", "runs", "--runs", long],
            "data": ["launch", "--check", str(_recipe_with_data(tmp_path, "jsonl", long + ".jsonl"))]}[where]
    res = cli(*args, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "longer than the file system allows" in res.stderr and "give a shorter path" in res.stderr


def test_hostile_jsonl_through_the_cli_exits_2_with_file_and_line(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "ok", "label": "a"}\n{"text": "deep", "label": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    res = cli("launch", "--check", str(_recipe_with_data(tmp_path, "jsonl", str(data))))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{data}:2: invalid JSON: nested too deeply" in res.stderr


# ------------------------------------------------------------------ run folders


BAD_STATUS = ["[]", '"running"', "{}", '{"state": 7}', '{"state": "running", "winner": "yes"}',
              '{"state": "succeeded", "winner": {"metric": "eval_f1", "value": "high"}}',
              '{"state": "failed", "error": {"a": 1}}', "[" * 100_000, '{"state": ' + "9" * 5000 + "}",
              "\xff\xfe", ""]


def test_one_damaged_status_does_not_break_the_listing(tmp_path):
    reg = Registry(tmp_path)
    good = reg.allocate()
    good.update(state="succeeded", winner={"metric": "eval_f1", "value": 0.5})
    for text in BAD_STATUS:
        reg.allocate().status_path.write_bytes(text.encode("latin-1") if text == "\xff\xfe" else text.encode())
    res = cli("zeroship", "runs", "--runs", str(tmp_path), env={"COLUMNS": "300"})
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "eval_f1=0.5000" in res.stdout  # the good run is listed
    assert res.stdout.count("unreadable") == len(BAD_STATUS)
    for n in range(2, len(BAD_STATUS) + 2):  # every shape, in process
        with pytest.raises(RunError, match="corrupt status file"):
            reg.get(str(n)).status()
    for n in (2, 5, 10):  # and through each command that reads a status (a process each: a few)
        for args in (("zeroship", "runs", "show", str(n)), ("zeroship", "export", "onnx", str(n)),
                     ("launch", "--resume", str(n))):
            res = cli(*args, "--runs", str(tmp_path), timeout=120)
            assert res.returncode == 2 and "Traceback" not in res.stderr, (args, res.stderr)
            assert "corrupt status file" in res.stderr, (args, res.stderr)


def test_only_ascii_run_ids(tmp_path):
    reg = Registry(tmp_path)
    reg.allocate()
    for run_id in ["٤٢", "run-٤٢", "４２", "run-00000000001", "run-1/../../x", "-1", "run-1\x00"]:
        with pytest.raises(RunError, match="not a run id"):
            reg.get(run_id)
    res = cli("zeroship", "runs", "show", "٤٢", "--runs", str(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "not a run id" in res.stderr


@pytest.mark.parametrize("root", ["file", "/dev/null", "under-file"])
def test_storage_root_that_is_not_a_folder_exits_2(tmp_path, root):
    (tmp_path / "file").write_text("x")
    root = {"file": str(tmp_path / "file"), "/dev/null": "/dev/null", "under-file": str(tmp_path / "file" / "runs")}[
        root
    ]
    commands = [("zeroship", "runs"), ("zeroship", "export", "onnx", "latest"),
                ("launch", "recipes/quickstart_ner.yaml", "--check")]
    for args in commands if root == "/dev/null" else commands[:1]:
        res = cli(*args, "--runs", root, timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (args, res.stderr)
        assert "not a folder" in res.stderr, (args, res.stderr)
    assert (tmp_path / "file").read_text() == "x"


# ------------------------------------------------------------------ export targets and options


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@e2e
def test_export_out_never_replaces_what_zeroship_did_not_write(ner_run, tmp_path):
    user = tmp_path / "my-notes"
    user.mkdir()
    (user / "thesis.txt").write_text("precious")
    plain = tmp_path / "plain.txt"
    plain.write_text("also precious")
    link = tmp_path / "link"
    link.symlink_to(user)
    before = {"run": _tree(ner_run), "user": _tree(user), "plain": plain.read_text()}
    targets = [user, plain, link, ner_run, ner_run / "best", ner_run.parent, ner_run / "onnx" / "..",
               plain / "sub"]
    for target in targets:
        res = cli("zeroship", "export", "onnx", ner_run.name, "--runs", str(ner_run.parent), "--out", str(target),
                  timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (target, res.stderr)
        assert "--out" in res.stderr, res.stderr
    assert before == {"run": _tree(ner_run), "user": _tree(user), "plain": plain.read_text()}
    assert not list(tmp_path.glob(".*tmp-*")) and not list(ner_run.parent.glob(".*tmp-*"))


@e2e
def test_export_into_an_empty_folder_or_over_its_own_bundle(ner_run, ner_bundle, tmp_path):
    empty, out = tmp_path / "empty", tmp_path / "earlier"
    empty.mkdir()
    shutil.copytree(ner_bundle, out)  # an earlier export's bundle, recognised by its manifest
    earlier = out.stat().st_ino
    for target in (empty, out):
        res = cli("zeroship", "export", "onnx", ner_run.name, "--runs", str(ner_run.parent), "--out", str(target))
        assert res.returncode == 0, res.stderr[-2000:]
        assert (target / "manifest.json").is_file()
    assert out.stat().st_ino != earlier  # the earlier bundle was swapped for the new one
    (out / "mine.txt").write_text("a file the bundle does not list")
    res = cli("zeroship", "export", "onnx", ner_run.name, "--runs", str(ner_run.parent), "--out", str(out))
    assert res.returncode == 2 and "not a zeroship bundle" in res.stderr
    assert (out / "mine.txt").read_text() == "a file the bundle does not list"


BAD_OPTIONS = [
    (["--opset", "7"], "--opset"), (["--opset", "999999999999999999999"], "--opset"),
    (["--max-metric-drop", "nan"], "--max-metric-drop"), (["--max-metric-drop", "inf"], "--max-metric-drop"),
    (["--max-length", "0"], "--max-length"), (["--max-length", "1" + "0" * 5000], "--max-length"),
    (["--max-length", "100000"], "more than the encoder's 512 positions"),
]


@e2e
@pytest.mark.parametrize("options,expected", BAD_OPTIONS, ids=lambda v: str(v)[:30])
def test_export_options_out_of_range_exit_2(ner_run, tmp_path, options, expected):
    res = cli("zeroship", "export", "onnx", ner_run.name, "--runs", str(ner_run.parent), "--out",
              str(tmp_path / "b"), *options, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert expected in res.stderr and not (tmp_path / "b").exists()


@e2e
@pytest.mark.parametrize("options", [["--repeats", "0"], ["--threads", "0"], ["--threads", "-3"], ["--repeats", "x"]])
def test_bench_options_out_of_range_exit_2(ner_run, options):
    res = cli("zeroship", "export", "bench", ner_run.name, "--runs", str(ner_run.parent), *options)
    assert res.returncode == 2 and "Traceback" not in res.stderr and options[0] in res.stderr


@e2e
@pytest.mark.parametrize("target", ["folder", "missing-parent", "under-file"])
def test_evaluate_json_that_cannot_be_written_exits_2_before_evaluating(ner_run, tmp_path, target):
    (tmp_path / "file").write_text("x")
    path = {
        "folder": tmp_path,
        "missing-parent": tmp_path / "no" / "r.json",
        "under-file": tmp_path / "file" / "r.json",
    }[target]
    res = cli("zeroship", "evaluate", ner_run.name, "--runs", str(ner_run.parent), "--data",
              str(TOY_NER / "validation.conll"), "--json", str(path))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--json" in res.stderr, res.stderr
    assert "eval_f1=" not in res.stdout  # refused before the work


# ------------------------------------------------------------------ bundles


def _manifest_variants(bundle: Path) -> list[tuple[str, object]]:
    m = json.loads((bundle / "manifest.json").read_text())
    files_without_tokenizer = {k: v for k, v in m["files"].items() if k != "tokenizer.json"}
    return [
        ("tokenizer not listed", {**m, "files": files_without_tokenizer}),
        ("traversal name", {**m, "files": {**m["files"], "../status.json": m["files"]["onnx/model.onnx"]}}),
        ("traversal in onnx", {**m, "files": {**m["files"], "onnx/../../x": m["files"]["onnx/model.onnx"]}}),
        ("absolute name", {**m, "files": {**m["files"], "/etc/passwd": m["files"]["onnx/model.onnx"]}}),
        ("nested name", {**m, "files": {**m["files"], "sub/model.onnx": m["files"]["onnx/model.onnx"]}}),
        ("too deep", {**m, "files": {**m["files"], "onnx/a/model.onnx": m["files"]["onnx/model.onnx"]}}),
        ("backslash", {**m, "files": {**m["files"], "onnx\\model.onnx": m["files"]["onnx/model.onnx"]}}),
        ("list", [m]), ("string", "manifest"), ("null", None), ("number", 1e308),
        ("files is a list", {**m, "files": list(m["files"])}),
        ("bytes is text", {**m, "files": {**m["files"], "onnx/model.onnx": {"sha256": "0" * 64, "bytes": "12"}}}),
        ("sha256 not hex", {**m, "files": {**m["files"], "onnx/model.onnx": {"sha256": "z" * 64, "bytes": 1}}}),
        ("labels not a list", {**m, "labels": "O,B-PER"}), ("labels of numbers", {**m, "labels": [1, 2]}),
        ("task unknown", {**m, "task": "summarization"}), ("max_length bool", {**m, "max_length": True}),
        ("stride negative", {**m, "stride": -1}), ("inputs empty", {**m, "inputs": {}}),
        ("inputs unknown", {**m, "inputs": {"pixel_values": ["batch"]}}),
        ("future format", {**m, "format_version": 3}),
        ("no variant", {**m, "files": {"tokenizer.json": m["files"]["tokenizer.json"]}}),
        ("variants a list", {**m, "variants": ["int8"]}),
        ("batch_independent text", {**m, "variants": {**m["variants"],
                                                      "int8": {**m["variants"]["int8"], "batch_independent": "yes"}}}),
        ("casing text", {**m, "casing": "true"}), ("casing a number", {**m, "casing": 1}),
    ]


@e2e
def test_malformed_or_overreaching_manifests_are_bundle_errors(ner_bundle, tmp_path):
    from export.runtime import BundleError, Predictor

    cases = _manifest_variants(ner_bundle)
    cases += [("deep", "[" * 100_000 + "]" * 100_000), ("huge int", '{"format_version": ' + "1" * 5000 + "}"),
              ("not json", "{manifest"), ("not utf-8", b"\xff\xfe\x00")]
    for name, manifest in cases:
        bundle = tmp_path / name.replace(" ", "-")
        shutil.copytree(ner_bundle, bundle)
        raw = manifest if isinstance(manifest, (str, bytes)) else json.dumps(manifest)
        (bundle / "manifest.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
        with pytest.raises(BundleError, match="manifest"):
            Predictor.load(bundle)
        with pytest.raises(BundleError, match="manifest"):
            Predictor.load(bundle, verify=False)
    res = cli("zeroship", "export", "predict", str(tmp_path / "traversal-name"), "hello")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "not a plain name" in res.stderr


@e2e
def test_an_unlisted_tokenizer_cannot_be_swapped_in(ner_bundle, tmp_path):
    from export.runtime import BundleError, Predictor

    bundle = tmp_path / "b"
    shutil.copytree(ner_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    del m["files"]["tokenizer.json"]  # what an attacker who edits the manifest would do first
    (bundle / "manifest.json").write_text(json.dumps(m))
    tok = json.loads((bundle / "tokenizer.json").read_text())
    tok["normalizer"] = None
    (bundle / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(BundleError, match="tokenizer.json is not listed"):
        Predictor.load(bundle)


# ------------------------------------------------------------------ checkpoints

def _checkpoint_copy(ner_run: Path, tmp_path: Path) -> Path:
    src = sorted((ner_run / "ray").rglob("zeroship_state.json"))[-1].parent
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@e2e
def test_driver_merge_refuses_a_planted_pickle_before_unpickling(ner_run, tmp_path):
    from launcher.worker.checkpoint import merged_state_dict
    from launcher.worker.signing import CheckpointError

    ckpt = _checkpoint_copy(ner_run, tmp_path)
    assert merged_state_dict(ckpt)  # signed by the run's workers: merges
    marker = tmp_path / "payload-ran"
    plant_payload(ckpt / "zero" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt was changed"):
        merged_state_dict(ckpt)
    assert not marker.exists()


@e2e
def test_checkpoint_verification_refuses_added_missing_unsigned_and_foreign(ner_run, tmp_path):
    from launcher.worker.signing import SIGNATURE_PREFIX, CheckpointError, load_key, verify_checkpoint

    key = load_key()
    ckpt = _checkpoint_copy(ner_run, tmp_path)
    verify_checkpoint(ckpt, key)
    with pytest.raises(CheckpointError, match="another machine's key"):
        verify_checkpoint(ckpt, os.urandom(32))
    (ckpt / "zero" / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extra.pt was not written by this run"):
        verify_checkpoint(ckpt, key)
    (ckpt / "zero" / "extra.pt").unlink()
    (ckpt / "rng_rank1.pt").unlink()
    with pytest.raises(CheckpointError, match="rng_rank1.pt is missing"):
        verify_checkpoint(ckpt, key)
    for sig in ckpt.glob(f"{SIGNATURE_PREFIX}*"):
        sig.write_text('{"hmac_sha256": [1, 2]}')
    with pytest.raises(CheckpointError, match="not a signature file"):
        verify_checkpoint(ckpt, key)
    for sig in ckpt.glob(f"{SIGNATURE_PREFIX}*"):
        sig.unlink()
    with pytest.raises(CheckpointError, match="carries no zeroship signature"):
        verify_checkpoint(ckpt, key)


def test_signing_key_is_private_and_where_zeroship_key_file_says(tmp_path, monkeypatch):
    from launcher.worker.signing import load_key

    monkeypatch.setenv("ZEROSHIP_KEY_FILE", str(tmp_path / "keys" / "k"))
    key = load_key()
    assert len(key) == 32 and (tmp_path / "keys" / "k").stat().st_mode & 0o077 == 0
    assert load_key() == key  # made once, then reused
