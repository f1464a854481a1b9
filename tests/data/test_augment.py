"""Augmentation: label-preserving, BIO-valid, seeded, counted, training split only."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import ROOT, TOY_CLS, TOY_NER

from launcher.data.augment import augment, spans, valid_bio
from launcher.data.parse import Example, read_conll
from zeroship.errors import RecipeError

TRAIN = read_conll(str(TOY_NER / "train.conll"))
OFF = {"copies": 2, "mention_replacement": 0.0, "o_deletion": 0.0, "o_replacement": 0.0, "case": 0.0,
       "word_swap": 0.0, "word_deletion": 0.0}
BY_WHERE = {ex.where: ex for ex in TRAIN}


def run(**ops) -> tuple[list[Example], dict]:
    return augment(TRAIN, "token_classification", {**OFF, **ops}, seed=3)


def original(ex: Example) -> Example:
    return BY_WHERE[ex.where.removesuffix(" (augmented)")]


def entities(ex: Example) -> list[tuple[str, tuple[str, ...]]]:
    return [(kind, tuple(ex.tokens[s:e])) for s, e, kind in spans(ex.tags)]


def test_spans_and_validity_helpers():
    assert spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]) == [(0, 2, "PER"), (3, 4, "LOC"), (4, 6, "LOC")]
    assert valid_bio(["O", "B-PER", "I-PER"]) and not valid_bio(["O", "I-PER"])
    assert not valid_bio(["B-LOC", "I-PER"])


def test_everything_on_keeps_bio_valid_and_entity_types_in_order():
    out, counts = run(copies=3, mention_replacement=0.7, o_deletion=0.3, o_replacement=0.3, case=0.3)
    assert counts["examples"] == len(out) > len(TRAIN)
    for ex in out:
        assert valid_bio(ex.tags) and len(ex.tokens) == len(ex.tags) >= 1
        # each entity keeps its type and place among the others; only its words may change
        assert [k for k, _ in entities(ex)] == [k for k, _ in entities(original(ex))]
    # the reported counts are what the copies show
    assert all(0 < counts[op] <= counts["examples"] for op in ("mention_replacement", "o_deletion",
                                                               "o_replacement", "case"))


def test_mention_replacement_draws_from_mentions_of_the_same_type():
    pool = Counter((k, m) for ex in TRAIN for k, m in entities(ex))
    out, counts = run(mention_replacement=1.0)
    assert counts["examples"] == counts["mention_replacement"] == len(out) > 0
    for ex in out:
        orig = original(ex)
        assert [t for t in ex.tags if t == "O"] == [t for t in orig.tags if t == "O"]
        assert [w for w, t in zip(ex.tokens, ex.tags) if t == "O"] == [
            w for w, t in zip(orig.tokens, orig.tags) if t == "O"
        ]
        assert entities(ex) != entities(orig)
        assert all((k, m) in pool for k, m in entities(ex))
    # the label multiset changes only through mention length: B- counts per type are the same
    for ex in out:
        b = Counter(t for t in ex.tags if t.startswith("B-"))
        assert b == Counter(t for t in original(ex).tags if t.startswith("B-"))


def test_o_deletion_and_replacement_leave_entities_untouched():
    o_words = {w for ex in TRAIN for w, t in zip(ex.tokens, ex.tags) if t == "O"}
    deleted, counts = run(o_deletion=0.5)
    assert counts["o_deletion"] == len(deleted) > 0
    for ex in deleted:
        orig = original(ex)
        assert entities(ex) == entities(orig) and len(ex.tokens) < len(orig.tokens)
    replaced, counts = run(o_replacement=0.5)
    assert counts["o_replacement"] == len(replaced) > 0
    for ex in replaced:
        orig = original(ex)
        assert ex.tags == orig.tags and entities(ex) == entities(orig)
        assert all(w in o_words for w, t in zip(ex.tokens, ex.tags) if t == "O")


def test_case_perturbation_changes_case_only():
    out, counts = run(case=0.5)
    assert counts["case"] == len(out) > 0
    for ex in out:
        orig = original(ex)
        assert ex.tags == orig.tags and [w.lower() for w in ex.tokens] == [w.lower() for w in orig.tokens]
        assert ex.tokens != orig.tokens


def test_seeded_off_by_default_and_invalid_bio_left_alone():
    a, _ = run(copies=1, mention_replacement=0.5, case=0.2)
    b, _ = run(copies=1, mention_replacement=0.5, case=0.2)
    assert [(x.tokens, x.tags) for x in a] == [(x.tokens, x.tags) for x in b]
    other, _ = augment(TRAIN, "token_classification", {**OFF, "copies": 1, "mention_replacement": 0.5,
                                                       "case": 0.2}, seed=4)
    assert [(x.tokens, x.tags) for x in a] != [(x.tokens, x.tags) for x in other]
    assert run() == ([], {})
    broken = [Example(tokens=["Ann", "Lee", "ran"], tags=["O", "I-PER", "O"], where="x:1")]
    assert augment(broken, "token_classification", {**OFF, "case": 1.0}, seed=0) == ([], {"examples": 0, "case": 0})


def test_classification_swap_and_deletion_keep_label_and_words():
    import csv

    with open(TOY_CLS / "train.csv") as fh:
        train = [Example(text=r["text"], label=r["label"], where=f"t:{i}") for i, r in enumerate(csv.DictReader(fh))]
    by = {ex.where: ex for ex in train}
    swapped, counts = augment(train, "sequence_classification", {**OFF, "word_swap": 0.3}, seed=1)
    assert counts["word_swap"] == len(swapped) > 0
    for ex in swapped:
        orig = by[ex.where.removesuffix(" (augmented)")]
        assert ex.label == orig.label and sorted(ex.text.split()) == sorted(orig.text.split()) and ex.text != orig.text
    dropped, counts = augment(train, "sequence_classification", {**OFF, "word_deletion": 0.3}, seed=1)
    assert counts["word_deletion"] == len(dropped) > 0
    for ex in dropped:
        words, it = ex.text.split(), iter(by[ex.where.removesuffix(" (augmented)")].text.split())
        assert ex.label == by[ex.where.removesuffix(" (augmented)")].label
        assert all(w in it for w in words) and words  # a non-empty subsequence


def test_recipe_refuses_ops_of_the_other_task_and_kfold(tmp_path):
    from launcher.recipe.schema import load_recipe

    with pytest.raises(RecipeError, match="data.augmentation.word_swap: not an operation for token_classification"):
        load_recipe(ROOT / "recipes/quickstart_ner.yaml", ["data.augmentation.word_swap=0.1"])
    with pytest.raises(RecipeError, match="cannot be combined with sweep.kfold"):
        load_recipe(ROOT / "recipes/quickstart_ner.yaml", ["data.augmentation.case=0.1", "sweep={kfold: 3}"])


def test_plan_previews_the_copies_the_stream_makes():
    """The plan counts the copies (driver, a list); Ray Data tasks make them (launcher.data.ingest.AugmentRows,
    row by row, in any blocks): each copy is seeded by its example, so both make the same copies."""
    from launcher.data.ingest import AugmentRows
    from launcher.driver.plan import build_plan
    from launcher.recipe.schema import load_recipe

    path = ROOT / "recipes/quickstart_ner.yaml"
    recipe = load_recipe(path, ["data.augmentation.case=0.3", "data.augmentation.mention_replacement=0.3"])
    resolved = recipe.as_dict()
    plan = build_plan(recipe, str(path))
    train = plan.dataset.splits["train"].examples
    preview, counts = augment(train, "token_classification", resolved["data"]["augmentation"], recipe.train.seed)
    assert plan.augmentation == counts and counts["examples"] > 0
    assert len(train) == len(TRAIN)  # the plan keeps the originals; the copies are made in the stream
    rows = AugmentRows(resolved["data"]["augmentation"], train, "token_classification", recipe.train.seed)
    streamed = []
    for ex in reversed(train):  # another order (another block layout): the same copies
        out = rows({"tokens": ex.tokens, "tags": ex.tags, "where": ex.where})
        assert out[0]["where"] == ex.where  # the original first
        streamed += [(r["where"], r["tokens"], r["tags"]) for r in out[1:]]
    assert sorted(streamed) == sorted((e.where, e.tokens, e.tags) for e in preview)
