"""The model class: save → load round trip, corrupt files refused, freezing, parameter groups."""

from __future__ import annotations

import pytest
import torch

from launcher.nn.model import apply_freeze, apply_lora, build_model, load_model, merge_lora, param_groups
from zeroship.errors import RunError

MODEL = {"encoder": "packaged:all-MiniLM-L6-v2", "task": "token_classification", "num_hidden_layers": 1,
         "pooling": "cls", "head": {"dim": 32, "layers": 2, "activation": "gelu", "dropout": 0.1, "layernorm": True}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(MODEL, ["O", "B-X", "I-X"]).eval()


def test_round_trip_same_logits(tmp_path, model):
    model.save(tmp_path)
    loaded, meta = load_model(tmp_path)
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(model(ids, mask), loaded(ids, mask))
    assert meta["labels"] == ["O", "B-X", "I-X"] and meta["head"]["layers"] == 2


def test_sequence_head_mean_pooling_ignores_padding():
    torch.manual_seed(0)
    m = build_model({**MODEL, "task": "sequence_classification", "pooling": "mean"}, ["a", "b"]).eval()
    ids = torch.randint(1000, 2000, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        assert torch.allclose(m(ids, torch.ones_like(ids)), m(padded, mask), atol=1e-5)


def test_corrupt_or_missing_files_refused(tmp_path, model):
    model.save(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RunError, match="corrupt weights"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(RunError, match="corrupt"):
        load_model(tmp_path)
    with pytest.raises(RunError, match="missing"):
        load_model(tmp_path / "nope")


def test_dropout_overrides_reach_every_encoder_dropout_module():
    """regularization.hidden_dropout / attention_dropout (the workers pass them to build_model): the
    encoder's config and each of its Dropout modules carry them; None keeps the pretrained value (0.1)."""
    m = build_model({**MODEL, "num_hidden_layers": 2}, ["O", "B-X"], dropout={"hidden": 0.2, "attention": 0.3})
    assert m.encoder.config.hidden_dropout_prob == 0.2 and m.encoder.config.attention_probs_dropout_prob == 0.3
    layer = m.encoder.encoder.layer[1]
    assert layer.output.dropout.p == 0.2 and m.encoder.embeddings.dropout.p == 0.2
    assert layer.attention.self.dropout.p == 0.3  # the attention probabilities' (sdpa reads its p)
    kept = build_model(MODEL, ["O", "B-X"], dropout={"hidden": None, "attention": 0.0})
    assert kept.encoder.config.hidden_dropout_prob == 0.1 and kept.encoder.config.attention_probs_dropout_prob == 0.0
    assert kept.encoder.encoder.layer[0].output.dropout.p == 0.1


def test_freeze_and_param_groups():
    m = build_model({**MODEL, "num_hidden_layers": 2}, ["O", "B-X"])
    assert apply_freeze(m, 1) > 0
    assert not any(p.requires_grad for p in m.encoder.embeddings.parameters())
    assert not any(p.requires_grad for p in m.encoder.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in m.encoder.encoder.layer[1].parameters())
    groups = param_groups(m, 0.01, 1e-4, 1e-3)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in m.parameters() if p.requires_grad}  # frozen ones not optimized
    for g in groups:
        if g["weight_decay"] > 0:
            assert all(p.ndim >= 2 for p in g["params"])  # no decay on biases / LayerNorm
    head_lrs = {g["lr"] for g in groups if any(p is m.classifier.weight for p in g["params"])}
    assert head_lrs == {1e-3}


def test_layer_wise_lr_decay():
    m = build_model({**MODEL, "num_hidden_layers": 2}, ["O", "B-X"])
    lr_of = {id(p): g["lr"] for g in param_groups(m, 0.01, 1e-4, 1e-3, layer_decay=0.5) for p in g["params"]}
    enc = m.encoder
    expected = [(enc.embeddings.word_embeddings.weight, 1e-4 * 0.25), (enc.embeddings.LayerNorm.bias, 1e-4 * 0.25),
                (enc.encoder.layer[0].attention.self.query.weight, 1e-4 * 0.5),
                (enc.encoder.layer[1].output.dense.weight, 1e-4), (m.classifier.weight, 1e-3)]
    for param, lr in expected:
        assert lr_of[id(param)] == pytest.approx(lr)
    plain = {id(p): g["lr"] for g in param_groups(m, 0.01, 1e-4, None) for p in g["params"]}
    assert set(plain.values()) == {1e-4}  # off by default: one lr everywhere


def test_warm_start_extends_labels_keeping_old_rows(tmp_path, model):
    from launcher.nn.model import check_warm_start, warm_start

    model.save(tmp_path)  # parent labels: O, B-X, I-X
    new_labels = ["O", "B-NEW", "B-X", "I-NEW", "I-X"]  # extended, and in another order
    torch.manual_seed(1)
    child = warm_start(tmp_path, new_labels, MODEL["head"], take_head=True)
    assert check_warm_start(tmp_path, new_labels, "token_classification", MODEL["head"], True) == []
    for old_row, label in enumerate(["O", "B-X", "I-X"]):
        new_row = new_labels.index(label)
        assert torch.equal(child.classifier.weight[new_row], model.classifier.weight[old_row])
        assert torch.equal(child.classifier.bias[new_row], model.classifier.bias[old_row])
    assert not torch.equal(child.classifier.weight[1], child.classifier.weight[3])  # new rows initialised
    for (name, p), (_, q) in zip(child.encoder.state_dict().items(), model.encoder.state_dict().items()):
        assert torch.equal(p, q), name
    assert torch.equal(child.head.net[0].weight, model.head.net[0].weight)


def test_warm_start_refuses_dropped_labels_unless_head_is_fresh(tmp_path, model):
    from launcher.nn.model import check_warm_start, warm_start

    model.save(tmp_path)
    problems = check_warm_start(tmp_path, ["O", "B-Y", "I-Y"], "token_classification", MODEL["head"], True)
    assert problems and "drops or renames B-X, I-X" in problems[0] and "init_from_head: false" in problems[0]
    assert check_warm_start(tmp_path, ["O", "B-Y", "I-Y"], "token_classification", MODEL["head"], False) == []
    child = warm_start(tmp_path, ["O", "B-Y", "I-Y"], {**MODEL["head"], "dim": 8}, take_head=False)
    assert child.classifier.out_features == 3 and child.head.out_dim == 8
    assert torch.equal(child.encoder.embeddings.word_embeddings.weight, model.encoder.embeddings.word_embeddings.weight)


LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["query", "value", "dense"]}


def test_lora_trains_adapters_only_and_merges_to_the_same_logits(tmp_path):
    torch.manual_seed(0)
    m = build_model({**MODEL, "num_hidden_layers": 2}, ["O", "B-X", "I-X"])
    base = {n: p.detach().clone() for n, p in m.encoder.named_parameters()}
    n_adapter = apply_lora(m, LORA)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert n_adapter > 0 and all("lora_" in n or not n.startswith("encoder.") for n in trainable)
    assert any("lora_" in n for n in trainable) and any(n.startswith("classifier.") for n in trainable)
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to merge
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    m.eval()
    ids = torch.randint(1000, 2000, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        unmerged = m(ids, mask)
        merged = merge_lora(m)(ids, mask)
    assert torch.allclose(unmerged, merged, atol=1e-5)
    names = dict(m.encoder.named_parameters())
    assert not any("lora_" in n for n in names)  # a plain encoder again
    query = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(names[query], base[query])  # the adapters went into the weights
    embeddings = "embeddings.word_embeddings.weight"
    assert torch.equal(names[embeddings], base[embeddings])  # untargeted weights untouched
    m.save(tmp_path)
    loaded, _ = load_model(tmp_path)  # best/ loads without peft
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(ids, mask), merged, atol=1e-6)


def test_lora_with_unknown_targets_is_a_clear_error():
    m = build_model(MODEL, ["O", "B-X"])
    with pytest.raises(RunError, match="model.lora.targets"):
        apply_lora(m, {**LORA, "targets": ["q_proj_nope"]})
