"""Each regularizer's term, recomputed independently of launcher.worker.regularize and compared."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from launcher.data.features import collate, encode_ner
from launcher.data.parse import Example
from launcher.nn.model import build_model
from launcher.worker.regularize import TaskLoss

MODEL = {"encoder": "packaged:all-MiniLM-L6-v2", "task": "token_classification", "num_hidden_layers": 1,
         "pooling": "cls", "head": {"dim": 16, "layers": 1, "activation": "gelu", "dropout": 0.2, "layernorm": True}}
LABELS = ["O", "B-PER", "I-PER", "B-LOC"]


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoTokenizer

    from launcher.recipe.schema import resolve_encoder

    torch.manual_seed(0)
    model = build_model(MODEL, LABELS)
    tok = AutoTokenizer.from_pretrained(resolve_encoder(MODEL["encoder"]))
    examples = [Example(tokens=["Mara", "Okafor", "visited", "Aldmere"], tags=["B-PER", "I-PER", "O", "B-LOC"]),
                Example(tokens=["It", "rained"], tags=["O", "O"])]
    feats = encode_ner(tok, examples, {t: i for i, t in enumerate(LABELS)}, 32, 4)
    batch = collate(feats, tok.pad_token_id, True)
    labels = batch.pop("labels")
    return model, batch, labels


def ce(logits, labels, smoothing=0.0):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           label_smoothing=smoothing)


def test_off_means_plain_cross_entropy(setup):
    model, batch, labels = setup
    model.eval()
    total, parts = TaskLoss(model, {})(model, model, batch, labels)
    assert set(parts) == {"ce"}
    assert torch.allclose(total, ce(model(**batch), labels))


def test_label_smoothing(setup):
    model, batch, labels = setup
    model.eval()
    total, _ = TaskLoss(model, {"label_smoothing": 0.1})(model, model, batch, labels)
    assert torch.allclose(total, ce(model(**batch), labels, 0.1))
    assert not torch.allclose(total, ce(model(**batch), labels))


def test_l2_sp_is_half_alpha_squared_distance_to_pretrained(setup):
    model, batch, labels = setup
    model.eval()
    loss = TaskLoss(model, {"l2_sp": 0.5})
    _, parts = loss(model, model, batch, labels)
    assert parts["l2_sp"] == 0.0  # at θ₀
    weight = model.encoder.encoder.layer[0].output.dense.weight
    with torch.no_grad():
        weight.add_(0.01)
    try:
        _, parts = loss(model, model, batch, labels)
        expected = 0.5 * 0.5 * (0.01 ** 2) * weight.numel()
        assert parts["l2_sp"] == pytest.approx(expected, rel=1e-3)
    finally:
        with torch.no_grad():
            weight.sub_(0.01)


def test_l2_head(setup):
    model, batch, labels = setup
    model.eval()
    _, parts = TaskLoss(model, {"l2_head": 0.2})(model, model, batch, labels)
    head = [*model.head.parameters(), *model.classifier.parameters()]
    expected = 0.1 * sum(float((p.detach() ** 2).sum()) for p in head)
    assert parts["l2_head"] == pytest.approx(expected, rel=1e-5)


def test_r_drop_symmetric_kl_between_two_dropout_passes(setup):
    model, batch, labels = setup
    model.train()
    torch.manual_seed(11)
    total, parts = TaskLoss(model, {"r_drop": 2.0})(model, model, batch, labels)
    torch.manual_seed(11)  # the same two dropout masks, in the same order
    with torch.no_grad():  # the reference values only (dropout still applies: the model is in train mode)
        a, b = model(**batch), model(**batch)
    keep = labels.reshape(-1) != -100
    pa = a.reshape(-1, a.shape[-1])[keep].softmax(-1)
    pb = b.reshape(-1, b.shape[-1])[keep].softmax(-1)
    kl_ab = (pa * (pa.log() - pb.log())).sum(-1).mean()
    kl_ba = (pb * (pb.log() - pa.log())).sum(-1).mean()
    assert parts["r_drop"] == pytest.approx(float(2.0 * 0.5 * (kl_ab + kl_ba)), rel=1e-4)
    assert parts["r_drop"] > 0  # the two passes really differ
    assert parts["ce"] == pytest.approx(float(0.5 * (ce(a, labels) + ce(b, labels))), rel=1e-5)
    model.eval()
    _, parts = TaskLoss(model, {"r_drop": 2.0})(model, model, batch, labels)
    assert parts["r_drop"] == pytest.approx(0.0, abs=1e-6)  # no dropout: identical passes


def test_fgm_perturbs_word_embeddings_along_normalized_gradient(setup):
    model, batch, labels = setup
    model.eval()
    _, parts = TaskLoss(model, {"fgm_epsilon": 1.0})(model, model, batch, labels)
    emb = model.encoder.embeddings.word_embeddings(batch["input_ids"]).detach().requires_grad_(True)
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    assert torch.allclose(model(inputs_embeds=emb, **rest), model(**batch), atol=1e-6)
    clean = ce(model(inputs_embeds=emb, **rest), labels)
    (grad,) = torch.autograd.grad(clean, emb)
    adversarial = ce(model(inputs_embeds=emb + grad / grad.norm(), **rest), labels)
    assert parts["fgm"] == pytest.approx(float(adversarial.detach()), rel=1e-5)
    assert parts["fgm"] > parts["ce"]  # a step up the gradient raises the loss


def test_regularizers_backpropagate(setup):
    model, batch, labels = setup
    model.train()
    model.zero_grad()
    total, parts = TaskLoss(model, {"r_drop": 1.0, "fgm_epsilon": 0.5, "l2_head": 0.1})(model, model, batch, labels)
    total.backward()
    assert set(parts) == {"ce", "r_drop", "fgm", "l2_head"}
    assert model.encoder.embeddings.word_embeddings.weight.grad is not None
    model.zero_grad()
