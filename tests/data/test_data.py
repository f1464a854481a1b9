"""Readers, label sets, alignment, windows and batching — with the tokenizer that training uses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, TOY_CLS, TOY_NER

from launcher.data.features import encode_ner, length_grouped_batches, merge_word_predictions
from launcher.data.parse import Example, load_dataset, read_conll, read_csv, read_jsonl
from zeroship.errors import DataError


def _ner_data(**kw):
    return {"format": "conll", "train": str(TOY_NER / "train.conll"),
            "validation": str(TOY_NER / "validation.conll"), "test": None, "labels": None, **kw}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from launcher.recipe.schema import resolve_encoder

    return AutoTokenizer.from_pretrained(resolve_encoder("packaged:all-MiniLM-L6-v2"))


def test_conll_reader_skips_docstart_and_splits_sentences(tmp_path):
    f = tmp_path / "a.conll"
    f.write_text("-DOCSTART- -X- O O\n\nAnna NNP B-PER\nruns VBZ O\n\n\nBerlin\tNNP\tB-LOC\n")
    ex = read_conll(str(f))
    assert [e.tokens for e in ex] == [["Anna", "runs"], ["Berlin"]]
    assert [e.tags for e in ex] == [["B-PER", "O"], ["B-LOC"]]


@pytest.mark.parametrize("content,where,what", [
    ("a O\nb\n", ":2", "column"),
    ("a x O\nb O\n", ":2", "expected 3 columns"),
    ("a O\n\nb B-PER\nc B-PER I-PER\n", ":4", "expected 2 columns"),
])
def test_conll_errors_name_line(tmp_path, content, where, what):
    f = tmp_path / "bad.conll"
    f.write_text(content)
    with pytest.raises(DataError) as err:
        read_conll(str(f))
    assert f"bad.conll{where}" in str(err.value) and what in str(err.value)


def test_non_utf8_names_line(tmp_path):
    f = tmp_path / "latin.conll"
    f.write_bytes(b"a O\n\nb O\nM\xfcller B-PER\n")
    with pytest.raises(DataError, match=r"latin.conll:4: not UTF-8"):
        read_conll(str(f))


def test_jsonl_reader_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"tokens": ["a", "b"], "tags": ["O", "B-X"]}\n\n{"tokens": ["a"], "tags": []}\n{bad\n')
    with pytest.raises(DataError) as err:
        read_jsonl(str(f), "token_classification")
    text = str(err.value)
    assert "d.jsonl:3: 1 tokens but 0 tags" in text and "d.jsonl:4: invalid JSON" in text
    f.write_text('{"text": "hi", "label": 1}\n')
    assert read_jsonl(str(f), "sequence_classification")[0].label == "1"


def test_csv_reader_any_delimiter_and_errors(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("id\tsentence\ttopic\n1\thello there\tgreet\n2\tbye\n")
    with pytest.raises(DataError, match=r"d.tsv:3: expected 3 columns, got 2"):
        read_csv(str(f), "sentence", "topic", "\t")
    f.write_text("id\tsentence\ttopic\n1\thello there\tgreet\n")
    assert read_csv(str(f), "sentence", "topic", "\t")[0].text == "hello there"
    with pytest.raises(DataError, match="header has no column 'text'"):
        read_csv(str(f), "text", "topic", "\t")


def test_label_inference_o_first_sorted_and_closed_set(tmp_path):
    ds = load_dataset(_ner_data(), "token_classification")
    assert ds.labels[0] == "O" and ds.labels[1:] == sorted(ds.labels[1:])
    with pytest.raises(DataError, match="is not in data.labels"):
        load_dataset(_ner_data(labels=["O", "B-PER", "I-PER"]), "token_classification")
    cls = load_dataset(
        {
            "format": "csv",
            "train": str(TOY_CLS / "train.csv"),
            "validation": str(TOY_CLS / "validation.csv"),
            "test": None,
            "labels": None,
            "text_column": "text",
            "label_column": "label",
            "delimiter": ",",
        },
        "sequence_classification",
    )
    assert cls.labels == ["business", "science", "sports"]


def test_invalid_bio_is_a_warning_with_count(tmp_path):
    f = tmp_path / "t.conll"
    f.write_text("a I-PER\nb O\n\nc B-LOC\nd I-LOC\n\ne O\nf I-ORG\n")
    ds = load_dataset({"format": "conll", "train": str(f), "validation": str(f), "test": None, "labels": None},
                      "token_classification")
    assert ds.splits["train"].invalid_bio == 2
    assert any("2 sentence(s) with invalid BIO" in w for w in ds.warnings())


def test_first_subtoken_alignment(tokenizer):
    ex = [Example(tokens=["Vandersloot", "visited", "Quillon"], tags=["B-PER", "O", "B-LOC"])]
    label2id = {"O": 0, "B-PER": 1, "B-LOC": 2}
    (feat,) = encode_ner(tokenizer, ex, label2id, 64, 8)
    labelled = [(wid, lab) for wid, lab in zip(feat.word_ids, feat.labels) if lab != -100]
    assert labelled == [(0, 1), (1, 0), (2, 2)]  # exactly one label per word, on its first subtoken
    assert feat.word_ids.count(0) > 1  # "Vandersloot" really is split into several subtokens


def test_label_all_tokens_gives_later_subtokens_the_continuation_label(tokenizer):
    ex = [Example(tokens=["Vandersloot", "Kestrelwick", "visited", "Quillon"], tags=["B-PER", "I-PER", "O", "B-LOC"])]
    label2id = {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3}  # no I-LOC: a B-LOC word's pieces stay B-LOC
    (first,) = encode_ner(tokenizer, ex, label2id, 64, 8)
    (every,) = encode_ner(tokenizer, ex, label2id, 64, 8, label_all=True)
    pieces = {w: [lab for wid, lab in zip(every.word_ids, every.labels) if wid == w] for w in range(4)}
    assert pieces[0][0] == 1 and set(pieces[0][1:]) == {2} and len(pieces[0]) > 1  # B-PER, then I-PER
    assert set(pieces[1]) == {2} and len(pieces[1]) > 1  # an I-PER word: I-PER throughout
    assert pieces[2] == [0]
    assert set(pieces[3]) == {3} and len(pieces[3]) > 1  # B-LOC, and B-LOC again for want of I-LOC
    assert [lab for wid, lab in zip(every.word_ids, every.labels) if wid is None] == [-100, -100]  # [CLS], [SEP]
    assert every.starts == first.starts and every.input_ids == first.input_ids
    assert [lab for lab, s in zip(every.labels, every.starts) if s] == [lab for lab in first.labels if lab != -100]


def test_label_all_tokens_in_a_window_that_begins_mid_word(tokenizer):
    words = ["Vandersloot"] * 30
    feats = encode_ner(tokenizer, [Example(tokens=words, tags=["B-PER"] * 30)], {"O": 0, "B-PER": 1, "I-PER": 2},
                       12, 4, label_all=True)
    cut = next(f for f in feats[1:] if not f.starts[1])  # a window whose first piece continues a word
    assert cut.labels[1] == 2  # trained as the word's continuation, never as its start
    assert all(lab == 1 for lab, s in zip(cut.labels, cut.starts) if s)


def test_inferred_ner_labels_have_an_i_for_every_b(tmp_path):
    from launcher.data.parse import label_order

    assert label_order("token_classification", {"O", "B-LOC", "B-PER", "I-PER"}) == ["O", "B-LOC", "B-PER", "I-LOC",
                                                                                      "I-PER"]
    assert label_order("sequence_classification", {"B-grade", "a"}) == ["B-grade", "a"]


def test_long_sentence_windows_cover_every_word_and_merge_back(tokenizer):
    words = [f"w{i}" for i in range(120)]
    tags = ["B-X" if i % 7 == 0 else "O" for i in range(120)]
    feats = encode_ner(tokenizer, [Example(tokens=words, tags=tags)], {"O": 0, "B-X": 1}, 32, 8)
    assert len(feats) > 3  # no silent truncation: overflow windows exist
    seen = {wid for f in feats for wid, lab in zip(f.word_ids, f.labels) if lab != -100}
    assert seen == set(range(120))
    # feed each window its gold labels as "predictions": the merge must give back the gold sequence
    preds = [[lab if lab != -100 else 0 for lab in f.labels] for f in feats]
    merged = merge_word_predictions(feats, preds, [120])
    assert merged[0] == [1 if t == "B-X" else 0 for t in tags]


def test_batches_are_length_grouped():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47, 9, 46, 10]
    batches = length_grouped_batches(lengths, 2, seed=1, shuffle=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    spread = max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread <= 10  # similar lengths together
    assert length_grouped_batches(lengths, 2, 1, True) == batches  # seeded


def test_encoding_through_tokenizers_alone_equals_transformers(tokenizer):
    """Ray Data's tasks encode with the model folder's tokenizer.json (`tokenizers`, no transformers):
    the same windows, ids and labels as the transformers tokenizer's own overflow API gives."""
    import tokenizers

    from launcher.data.features import encode_cls
    from launcher.recipe.schema import resolve_encoder

    raw = tokenizers.Tokenizer.from_file(str(Path(resolve_encoder("packaged:all-MiniLM-L6-v2")) / "tokenizer.json"))
    settings = raw.truncation
    examples = read_conll(str(TOY_NER / "validation.conll"))[:40]
    examples.append(Example(tokens=[f"Aldmere{i}" for i in range(60)], tags=["B-LOC"] * 60))  # several windows
    label2id = {t: i for i, t in enumerate(sorted({t for ex in examples for t in ex.tags}))}
    ours, direct = encode_ner(tokenizer, examples, label2id, 24, 6), encode_ner(raw, examples, label2id, 24, 6)
    assert ours == direct and len(ours) > len(examples)
    hf = tokenizer([ex.tokens for ex in examples], is_split_into_words=True, truncation=True, max_length=24,
                   stride=6, return_overflowing_tokens=True)
    assert [f.input_ids for f in ours] == hf["input_ids"]
    assert [f.example for f in ours] == hf["overflow_to_sample_mapping"]
    assert [f.word_ids for f in ours] == [hf.word_ids(i) for i in range(len(ours))]
    texts = [Example(text=" ".join(ex.tokens), label="x") for ex in examples]
    assert [f.input_ids for f in encode_cls(raw, texts, {"x": 0}, 16)] == tokenizer(
        [ex.text for ex in texts], truncation=True, max_length=16)["input_ids"]
    assert raw.truncation == settings  # the caller's tokenizer is left as it was


def test_window_starting_mid_word_does_not_label_continuation(tokenizer):
    words = ["Vandersloot"] * 40  # every word splits into several subtokens
    feats = encode_ner(tokenizer, [Example(tokens=words, tags=["B-PER"] * 40)], {"O": 0, "B-PER": 1}, 16, 5)
    assert len(feats) > 2
    for f in feats:
        for tok, wid, lab in zip(tokenizer.convert_ids_to_tokens(f.input_ids), f.word_ids, f.labels):
            if lab != -100:
                assert not tok.startswith("##"), (tok, wid)


def test_kfold_fold_of_an_example_is_its_where_hashed_the_same_in_every_process():
    import subprocess
    import sys

    from launcher.data.ingest import fold_of

    wheres = [f"shards/part-{i % 7:04d}.conll:{i * 3 + 1}" for i in range(2000)]
    folds = [fold_of(w, 5) for w in wheres]
    sizes = [folds.count(f) for f in range(5)]
    assert min(sizes) > 300 and max(sizes) < 500, sizes  # spread evenly (a hash, not a counter)
    # Python's own str hash is salted per process: a worker or a resumed run must agree with this one
    code = ("import sys, json; from launcher.data.ingest import fold_of; "
            "print(json.dumps([fold_of(w, 5) for w in json.load(sys.stdin)]))")
    for salt in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(wheres), capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": salt}, cwd=ROOT, check=True).stdout
        assert json.loads(out) == folds


@pytest.mark.parametrize("cluster_cpus,workers,cpus_per_worker,expected", [
    (3, 2, 1, 2),  # a local Ray on 2 cores, 2 workers: 1 CPU for Ray Data, yet 2 tasks (parse and tokenize overlap)
    (3, 1, 1, 2),  # 1 worker: 2 CPUs, 2 tasks (quarter-CPU tasks alone would start 8 processes)
    (16, 1, 4, 12),  # a GPU node with 16 CPUs and one 4-CPU worker: a task per spare CPU
    (2, 4, 1, 2),  # more workers than CPUs (refused by the plan before this): still 2
])
def test_tokenization_runs_one_task_per_spare_cpu_and_at_least_two(monkeypatch, cluster_cpus, workers,
                                                                     cpus_per_worker, expected):
    import ray

    from launcher.data.ingest import data_tasks
    from launcher.recipe.schema import load_recipe

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(cluster_cpus)})  # the one fake: a cluster
    recipe = load_recipe(ROOT / "recipes/quickstart_ner.yaml",
                         [f"scaling.workers={workers}", f"scaling.cpus_per_worker={cpus_per_worker}"])
    assert data_tasks(recipe) == expected
