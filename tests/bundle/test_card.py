"""export.card: the bundle's model card, from a manifest and a recipe (no model needed)."""

from __future__ import annotations

from export.card import encoder_name, model_card

MANIFEST = {
    "run": "run-7", "task": "token_classification", "labels": ["O", "B-PER", "I-PER"], "metric": "eval_f1",
    "max_length": 128, "stride": 32, "casing": True, "inputs": {"input_ids": [], "attention_mask": [],
                                                                 "token_type_ids": []},
    "variants": {"fp32": {"file": "model.onnx"}, "int8": {"file": "model_int8.onnx", "method": "static"}},
    "metrics": {"torch": {"eval_f1": 0.91234}, "onnx": {"eval_f1": 0.91234}, "int8": {"eval_f1": 0.9061}},
    "test_metrics": {"torch": {"eval_f1": 0.88}, "onnx": {"eval_f1": 0.88}, "int8": {"eval_f1": 0.875}},
    "metric_drop_points": {"int8": 0.624}, "metric_budget_points": 0.5,
}
RECIPE = {"model": {"encoder": "/home/alice/models/minilm-l6", "head": {"dim": 128}},
          "train": {"epochs": 3, "lr": 5e-05, "schedule": "linear", "batch_size": 16, "grad_accum": 1, "seed": 7},
          "deepspeed": {"zero_stage": 2, "precision": "bf16"}, "scaling": {"workers": 2},
          "regularization": {"weight_decay": 0.01, "label_smoothing": 0.0, "r_drop": 0},
          "data": {"augmentation": {"case": 0.2, "word_swap": 0}}}


def test_the_card_tells_quality_per_variant_training_and_use():
    card = model_card(MANIFEST, RECIPE)
    assert card.startswith("# run-7: named-entity recognition")
    assert "`O`, `B-PER`, `I-PER`" in card
    assert "| PyTorch (reference) | — | 0.9123 | 0.8800 | — |" in card
    assert "| fp32 | `model.onnx` | 0.9123 | 0.8800 | 0.00 (parity-checked) |" in card
    assert "| int8 (static) | `model_int8.onnx` | 0.9061 | 0.8750 | +0.62 |" in card
    assert "entity-level F1" in card and "held to 0.5 points" in card
    assert "at most 128 tokens per window" in card and "overlap by 32 tokens" in card
    assert "first sub-token" in card and "casing class (0 none, 1 lower, 2 title, 3 upper, 4 mixed)" in card
    assert "- encoder: `minilm-l6`" in card and "/home/alice" not in card  # no path of the training machine
    assert "3 epochs, lr 5e-05, linear schedule, batch 16 × 1 accumulation × 2 workers, seed 7" in card
    assert "ZeRO stage 2, precision bf16" in card
    assert "regularization: weight_decay 0.01" in card and "label_smoothing" not in card
    assert "augmentation: case 0.2" in card and "word_swap" not in card
    assert "Predictor.load(" in card and "zeroship serve" in card and "tokenizer.json" in card


def test_a_classification_card_without_test_split_or_casing():
    manifest = {**MANIFEST, "task": "sequence_classification", "labels": ["neg", "pos"], "metric": "eval_accuracy",
                "casing": False, "variants": {"fp32": {"file": "model.onnx"}}, "metric_drop_points": {},
                "metrics": {"torch": {"eval_accuracy": 0.8}, "onnx": {"eval_accuracy": 0.8}}}
    del manifest["test_metrics"]
    card = model_card(manifest, {**RECIPE, "model": {"encoder": "packaged:all-MiniLM-L6-v2"}})
    assert card.startswith("# run-7: text classification") and "| fp32 | `model.onnx` | 0.8000 | — |" in card
    assert "a longer text is truncated" in card and "casing class" not in card and "sub-token" not in card
    assert "`all-MiniLM-L6-v2`" in card


def test_encoder_name_never_shows_a_folder_path():
    assert encoder_name("packaged:all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    assert encoder_name("/srv/models/bert-base-cased/") == "bert-base-cased"
    assert encoder_name("C:\\models\\bert") == "bert"
    assert encoder_name("bert-base-cased") == "bert-base-cased"


def test_the_card_says_how_transformers_js_loads_it_or_why_not():
    card = model_card(MANIFEST, RECIPE)  # casing: Transformers.js's pipeline would feed zero token types
    assert "feeds zero token types" in card and "pipeline('" not in card
    plain = {**MANIFEST, "casing": False}
    card = model_card(plain, {**RECIPE, "data": {"label_all_tokens": True}})
    assert "every sub-token was trained" in card and "first sub-token's** prediction" not in card
    assert "pipeline('token-classification', 'this-folder', { dtype: 'q8' })" in card
    assert "aggregation_strategy: 'simple'" in card and "trained on first sub-tokens only" not in card
    card = model_card(plain, RECIPE)  # a run from before data.label_all_tokens: first sub-tokens only
    assert "first sub-token's** prediction" in card and "trained on first sub-tokens only: `simple`" in card
    cls = {**plain, "task": "sequence_classification", "labels": ["neg", "pos"]}
    assert "pipeline('text-classification', 'this-folder'" in model_card(cls, RECIPE)
