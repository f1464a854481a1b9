"""Casing classes (`model.casing`): what the uncased tokenizer drops, as token types — the classes
themselves, the features, the grown token-type table, and the runtime computing what training did."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from launcher.data.features import encode_cls, encode_ner
from launcher.data.parse import Example
from launcher.nn.model import (
    ZeroshipModel,
    apply_freeze,
    apply_lora,
    build_model,
    check_warm_start,
    load_model,
    merge_lora,
    warm_start,
)
from zeroship.casing import CLASSES, LOWER, MIXED, NONE, TITLE, UPPER, casing_class
from zeroship.errors import RunError

MODEL = {"encoder": "packaged:all-MiniLM-L6-v2", "task": "token_classification", "num_hidden_layers": 1,
         "pooling": "cls", "head": {"dim": 32, "layers": 1, "activation": "gelu", "dropout": 0.0, "layernorm": True},
         "casing": True}
LABELS = ["O", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from launcher.recipe.schema import resolve_encoder

    return AutoTokenizer.from_pretrained(resolve_encoder("packaged:all-MiniLM-L6-v2"))


@pytest.mark.parametrize("piece, expected", [
    ("okafor", LOWER), ("Okafor", TITLE), ("I", TITLE), ("McDonald", TITLE), ("NATO", UPPER), ("U.S.", UPPER),
    ("iPhone", MIXED), ("42", NONE), ("-", NONE), ("", NONE), ("Ärzte", TITLE), ("straße", LOWER),
    ("ÉCOLE", UPPER), ("日本", NONE), ("x2", LOWER), ("\u2028", NONE),
])
def test_casing_class(piece, expected):
    assert casing_class(piece) == expected


def test_the_uncased_tokenizer_loses_what_the_casing_ids_keep(tokenizer):
    words = ["Apple", "apple", "APPLE"]
    (feat,) = encode_ner(tokenizer, [Example(tokens=words, tags=["O"] * 3)], {"O": 0}, 16, 4, casing=True)
    assert feat.input_ids[1] == feat.input_ids[2] == feat.input_ids[3]  # lowercased: one id for all three
    assert feat.token_type_ids == [NONE, TITLE, LOWER, UPPER, NONE]  # [CLS] … [SEP]
    (plain,) = encode_ner(tokenizer, [Example(tokens=words, tags=["O"] * 3)], {"O": 0}, 16, 4)
    assert set(plain.token_type_ids) == {0}


def test_each_subtoken_takes_the_class_of_its_own_characters(tokenizer):
    (feat,) = encode_ner(tokenizer, [Example(tokens=["Okafor", "OKAFOR"], tags=["O", "O"])], {"O": 0}, 32, 4,
                         casing=True)
    pieces = tokenizer.convert_ids_to_tokens(feat.input_ids)
    assert pieces == ["[CLS]", "ok", "##af", "##or", "ok", "##af", "##or", "[SEP]"]
    assert feat.token_type_ids == [NONE, TITLE, LOWER, LOWER, UPPER, UPPER, UPPER, NONE]


def test_windows_keep_their_tokens_classes(tokenizer):
    words = ["Mara", "met", "NATO"] * 10
    feats = encode_ner(tokenizer, [Example(tokens=words, tags=["O"] * 30)], {"O": 0}, 12, 4, casing=True)
    assert len(feats) > 2
    expected = {"mara": TITLE, "met": LOWER, "nato": UPPER, "[CLS]": NONE, "[SEP]": NONE}
    for feat in feats:
        pieces = tokenizer.convert_ids_to_tokens(feat.input_ids)
        assert feat.token_type_ids == [expected[p] for p in pieces]


def test_the_runtime_computes_what_training_computed(tokenizer):
    """Training sees pre-split words; a bundle sees raw text. Same sentence, same classes."""
    from export.runtime import Predictor
    from launcher.data.features import backend

    text = "Mara Okafor ( NATO ) met an iPhone maker in São Paulo , 2024 ."
    (feat,) = encode_ner(tokenizer, [Example(tokens=text.split(), tags=["O"] * len(text.split()))], {"O": 0},
                         64, 8, casing=True)
    enc = backend(tokenizer, 64, 8).encode(text)
    assert enc.ids == feat.input_ids
    assert Predictor.type_ids_of(SimpleNamespace(casing=True), [enc], [text]) == [feat.token_type_ids]
    assert Predictor.type_ids_of(SimpleNamespace(casing=False), [enc], [text]) is None
    (cls,) = encode_cls(tokenizer, [Example(text=text, label="x")], {"x": 0}, 64, casing=True)
    assert cls.token_type_ids == feat.token_type_ids


def test_grown_table_starts_as_the_pretrained_model():
    """Every casing row starts as the pretrained type-0 row: outputs do not depend on the classes yet."""
    torch.manual_seed(0)
    model = build_model(MODEL, LABELS).eval()
    table = model.encoder.embeddings.token_type_embeddings
    assert table.num_embeddings == CLASSES == model.encoder.config.type_vocab_size
    ids = torch.randint(1000, 2000, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = model(ids, mask, torch.zeros_like(ids))
        assert torch.equal(model(ids, mask, torch.randint(0, CLASSES, ids.shape)), plain)
        table.weight[UPPER] += 1.0  # once trained apart, the class matters
        assert not torch.allclose(model(ids, mask, torch.full_like(ids, UPPER)), plain)


def test_save_load_keeps_casing(tmp_path):
    torch.manual_seed(0)
    model = build_model(MODEL, LABELS).eval()
    with torch.no_grad():
        model.encoder.embeddings.token_type_embeddings.weight[TITLE] += 0.5
    model.save(tmp_path)
    loaded, meta = load_model(tmp_path)
    assert meta["casing"] is True and loaded.casing
    ids, types = torch.randint(1000, 2000, (1, 6)), torch.tensor([[0, 2, 1, 2, 3, 0]])
    with torch.no_grad():
        assert torch.equal(model(ids, torch.ones_like(ids), types), loaded(ids, torch.ones_like(ids), types))


def test_frozen_embeddings_and_lora_still_train_the_casing_rows():
    model = build_model(MODEL, LABELS)
    apply_freeze(model, "embeddings")
    assert model.encoder.embeddings.token_type_embeddings.weight.requires_grad
    assert not model.encoder.embeddings.word_embeddings.weight.requires_grad
    lora = build_model(MODEL, LABELS)
    apply_lora(lora, {"r": 2, "alpha": 4, "dropout": 0.0, "targets": ["query", "value"]})
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any(n.endswith("token_type_embeddings.weight") for n in trainable)
    assert not any(n.endswith("word_embeddings.weight") for n in trainable)
    assert merge_lora(lora).encoder.embeddings.token_type_embeddings.num_embeddings == CLASSES


def test_warm_start_grows_a_plain_parent_and_refuses_to_drop_casing(tmp_path):
    torch.manual_seed(0)
    plain = build_model({**MODEL, "casing": False}, LABELS)
    plain.save(tmp_path / "plain")
    child = warm_start(tmp_path / "plain", LABELS, MODEL["head"], take_head=True, casing=True)
    assert child.casing and child.encoder.embeddings.token_type_embeddings.num_embeddings == CLASSES
    build_model(MODEL, LABELS).save(tmp_path / "cased")
    problems = check_warm_start(tmp_path / "cased", LABELS, "token_classification", MODEL["head"], True)
    assert problems == ["the parent was trained with casing classes as its token types; set model.casing: true"]
    assert check_warm_start(tmp_path / "cased", LABELS, "token_classification", MODEL["head"], True, casing=True) == []


def test_an_encoder_without_token_types_is_refused():
    from transformers import DistilBertConfig, DistilBertModel

    encoder = DistilBertModel(DistilBertConfig(n_layers=1, dim=32, hidden_dim=64, n_heads=2, vocab_size=100))
    from launcher.nn.model import enable_casing

    with pytest.raises(RunError, match="model.casing.*no token-type embeddings"):
        enable_casing(encoder)
    # without casing such an encoder trains as before: freezing looks for no casing rows
    plain = ZeroshipModel(encoder, "token_classification", LABELS, MODEL["head"])
    assert apply_freeze(plain, "embeddings") == len(list(encoder.embeddings.parameters()))


def test_the_casing_rows_train_at_the_heads_lr():
    from launcher.nn.model import param_groups

    model = build_model(MODEL, LABELS)
    table = model.encoder.embeddings.token_type_embeddings.weight
    groups = param_groups(model, 0.01, 1e-4, 1e-3)
    (lr,) = [g["lr"] for g in groups if any(p is table for p in g["params"])]
    (word_lr,) = [g["lr"] for g in groups if any(p is model.encoder.embeddings.word_embeddings.weight
                                                 for p in g["params"])]
    assert (lr, word_lr) == (1e-3, 1e-4)


def test_launch_check_refuses_casing_for_an_encoder_without_token_types(tmp_path):
    """Said before anything starts, at the recipe's field (the workers would fail in enable_casing)."""
    import subprocess
    import sys
    from pathlib import Path

    from launcher.driver.plan import check_casing
    from launcher.recipe.schema import RecipeError

    encoder = tmp_path / "distil"
    encoder.mkdir()
    (encoder / "config.json").write_text('{"model_type": "distilbert", "dim": 32}')
    with pytest.raises(RecipeError, match="model.casing.*distilbert.*no token-type"):
        check_casing(str(encoder), "r.yaml model.casing")
    (encoder / "config.json").write_text('{"model_type": "bert", "type_vocab_size": 2}')
    check_casing(str(encoder), "r.yaml model.casing")  # BERT: fine
    for hostile in ("[1, 2]", "[" * 100_000, "\ufeff{}"):  # not an object, too deep, a BOM: transformers judges
        (encoder / "config.json").write_text(hostile)
        check_casing(str(encoder), "r.yaml model.casing")
    (encoder / "config.json").write_text('{"model_type": "distilbert", "dim": 32}')
    root = Path(__file__).resolve().parents[2]
    recipe = tmp_path / "r.yaml"
    recipe.write_text((root / "recipes/quickstart_ner.yaml").read_text()
                      .replace("packaged:all-MiniLM-L6-v2", str(encoder))
                      .replace("data/toy_ner/", str(root / "recipes/data/toy_ner") + "/"))
    res = subprocess.run([str(Path(sys.executable).parent / "launch"), "--check", str(recipe), "model.casing=true"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "model.casing" in res.stderr and "no token-type embeddings" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
