"""The plan's training windows (launcher.data.estimate): what the workers' schedule starts from, before Ray Data
reads anything. Checked against transformers' own tokenizer call, as a user would count windows."""

from __future__ import annotations

import pytest
from conftest import TOY_NER, tiny_ner_recipe

from launcher.data.augment import augment
from launcher.data.estimate import estimate
from launcher.data.ingest import block_rows, fold_of
from launcher.data.parse import LAUNCH_TRAIN_BYTES, load_dataset, read_conll
from launcher.recipe.schema import load_recipe, tokenizer_source


def _hf_windows(recipe, path) -> int:
    """Windows per transformers' fast tokenizer: pre-split words, truncation with overflow at the stride."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_source(recipe.model))
    words = [ex.tokens for ex in read_conll(str(path))]
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=recipe.data.max_length,
              stride=recipe.data.stride, return_overflowing_tokens=True)
    return len(enc["input_ids"])


def _plan(recipe):
    return load_dataset(recipe.as_dict()["data"], recipe.model.task, sample="train")


def test_a_split_read_whole_gives_the_exact_window_count(tmp_path):
    recipe = load_recipe(tiny_ner_recipe(tmp_path, data={"max_length": 16, "stride": 4}))  # long sentences: windows
    figures = estimate(recipe, _plan(recipe))
    want = _hf_windows(recipe, TOY_NER / "train.conll")
    assert want > 600  # some sentences need several windows at max_length 16
    assert figures.exact and figures.tokenized and figures.train_windows == want and figures.train_examples == 600
    assert figures.validation_windows == _hf_windows(recipe, TOY_NER / "validation.conll")
    assert figures.cache and figures.describe().startswith(f"{want:,} training windows per epoch; tokenized once")


def test_a_sampled_split_is_estimated_within_a_few_percent(tmp_path):
    big = tmp_path / "train64.conll"
    big.write_text((TOY_NER / "train.conll").read_text() * 64)
    assert big.stat().st_size > LAUNCH_TRAIN_BYTES  # the plan reads a sample of it
    recipe = load_recipe(tiny_ner_recipe(tmp_path, data={"train": str(big)}))
    figures = estimate(recipe, _plan(recipe))
    want = 64 * _hf_windows(recipe, TOY_NER / "train.conll")
    assert not figures.exact and abs(figures.train_windows - want) / want < 0.05, (figures.train_windows, want)
    assert figures.describe().startswith("≈ ")


def test_k_fold_and_augmentation_count_what_the_stream_makes(tmp_path):
    recipe = load_recipe(tiny_ner_recipe(tmp_path), ["data.augmentation.case=0.3"])
    plan = _plan(recipe)
    copies, _ = augment(plan.splits["train"].examples, recipe.model.task, recipe.as_dict()["data"]["augmentation"],
                        recipe.train.seed)
    assert 0 < len(copies) < 600  # a sentence no operation changed has no copy
    whole = estimate(recipe, plan)
    assert whole.train_windows == 600 + len(copies)  # one window each at max_length 48
    wheres = [ex.where for ex in plan.splits["train"].examples + copies]
    for f in range(3):
        held = sum(fold_of(w, 3) == f for w in wheres)
        assert estimate(recipe, plan, (3, f)).train_windows == len(wheres) - held


def test_without_the_tokenizer_the_driver_assumes_a_window_per_example(tmp_path, monkeypatch):
    recipe = load_recipe(tiny_ner_recipe(tmp_path))
    plan = _plan(recipe)
    monkeypatch.setattr("launcher.data.estimate.driver_tokenizer", lambda *a: None)  # a hub model, not downloaded
    figures = estimate(recipe, plan)
    assert not figures.exact and not figures.tokenized and figures.train_windows == 600
    assert "no tokenizer here" in figures.describe()


def test_the_cache_budget_decides_and_zero_turns_it_off(tmp_path):
    recipe = load_recipe(tiny_ner_recipe(tmp_path))
    plan = _plan(recipe)
    assert estimate(recipe, plan).cache
    off = estimate(load_recipe(tmp_path / "recipe.yaml", ["data.cache_mb=0"]), plan)
    assert not off.cache and "streamed and tokenized again every epoch" in off.describe()


@pytest.mark.parametrize(("examples", "world", "rows"), [(600, 2, 37), (10, 4, 16), (10**7, 8, 1024), (0, 1, 16)])
def test_small_splits_get_small_blocks_so_every_rank_spans_the_corpus(examples, world, rows):
    assert block_rows(examples, world) == rows
