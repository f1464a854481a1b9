"""Placement: every tensor a training step, an evaluation or the L2-SP/FGM terms use must reach the
model's device. CI has no GPU, so the model goes to PyTorch's `lazy` device (TorchScript-backed, in
the CPU build): a real non-CPU device that computes real values and refuses CPU operands in most ops.
Where an op would quietly accept a CPU tensor (an attention mask), a forward pre-hook checks every
input's device explicitly. A forgotten `to_device` fails these tests (see the last two)."""

from __future__ import annotations

import pytest
import torch

from launcher.data.features import collate, encode_ner, length_grouped_batches
from launcher.data.parse import Example
from launcher.eval.evaluate import evaluate_model, predict
from launcher.nn.device import module_device, to_device
from launcher.nn.model import build_model, param_groups
from launcher.worker.engine import train_step
from launcher.worker.loop_state import LossWindow
from launcher.worker.regularize import TaskLoss

lazy = pytest.importorskip("torch._lazy", reason="this PyTorch build has no lazy device")

MODEL = {"encoder": "packaged:all-MiniLM-L6-v2", "task": "token_classification", "num_hidden_layers": 1,
         "pooling": "cls", "head": {"dim": 16, "layers": 1, "activation": "gelu", "dropout": 0.1, "layernorm": True}}
LABELS = ["O", "B-PER", "I-PER", "B-LOC"]
EXAMPLES = [Example(tokens=["Mara", "Okafor", "visited", "Aldmere"], tags=["B-PER", "I-PER", "O", "B-LOC"]),
            Example(tokens=["It", "rained"], tags=["O", "O"]),
            Example(tokens=["Zofia", "Brandt", "left"], tags=["B-PER", "I-PER", "O"])]
# The regularizers that bring tensors of their own (θ₀, the FGM perturbation). R-Drop and label
# smoothing add none, and the lazy backend's TorchScript cannot run their kernels (kl_div and a smoothed
# cross-entropy fail there with a Float/Double mismatch, on any input).
REG = {"fgm_epsilon": 0.5, "l2_sp": 0.01, "l2_head": 0.001}


@pytest.fixture(scope="module")
def device():
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    return torch.device("lazy")


@pytest.fixture(scope="module")
def data():
    from transformers import AutoTokenizer

    from launcher.recipe.schema import resolve_encoder

    tok = AutoTokenizer.from_pretrained(resolve_encoder(MODEL["encoder"]))
    feats = encode_ner(tok, EXAMPLES, {t: i for i, t in enumerate(LABELS)}, 32, 4)
    return tok, feats


def guard(model: torch.nn.Module, device: torch.device) -> list[str]:
    """Record every tensor that reaches the model's forward on another device."""
    strays: list[str] = []

    def check(_module, args, kwargs):
        for name, value in [*enumerate(args), *kwargs.items()]:
            if isinstance(value, torch.Tensor) and value.device.type != device.type:
                strays.append(f"{name} on {value.device}")

    model.register_forward_pre_hook(check, with_kwargs=True)
    return strays


class Engine:
    """Stands in for the DeepSpeed engine (which only runs on its own accelerator): the same calls
    the worker makes, on a plain torch optimizer. The one fake in this file."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss):
        loss.backward()

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(MODEL, LABELS)


def test_to_device_moves_nested_tensors_and_leaves_the_rest(device):
    batch = {"ids": torch.ones(2, 3, dtype=torch.long), "more": [torch.zeros(1), (torch.ones(1), 3)], "name": "x"}
    moved = to_device(batch, device)
    assert moved["ids"].device.type == "lazy" and moved["ids"].dtype == torch.long
    assert moved["more"][0].device.type == "lazy" and moved["more"][1][0].device.type == "lazy"
    assert moved["more"][1][1] == 3 and moved["name"] == "x"
    assert batch["ids"].device.type == "cpu"  # the input is not changed


def test_training_step_with_every_regularizer_runs_on_the_models_device(device, data):
    tok, feats = data
    model = make_model()
    loss_fn = TaskLoss(model, REG, device=device)  # θ₀ taken on the CPU, as the worker does before DeepSpeed
    model.to(device)
    assert all(p0.device.type == "lazy" for p0 in loss_fn.anchor.values())
    strays = guard(model, device)
    engine = Engine(model, torch.optim.AdamW(param_groups(model, 0.01, 1e-3, None), lr=1e-3))
    before = model.classifier.weight.detach().cpu().clone()
    window = LossWindow()
    terms = train_step(engine, loss_fn, collate(feats, tok.pad_token_id, True), device)
    window.add(terms)
    assert strays == []
    assert set(terms) == {"loss", "ce", "fgm", "l2_sp", "l2_head"}
    assert all(t.device.type == "lazy" and t.dtype == torch.float32 for t in terms.values())  # no host sync
    assert not torch.equal(model.classifier.weight.detach().cpu(), before)  # the step really updated
    means = window.read()
    assert means["loss"] == pytest.approx(sum(means[k] for k in ("ce", "fgm", "l2_sp", "l2_head")), rel=1e-4)
    assert window.read() == {}  # read resets the window


def test_evaluation_on_the_device_matches_the_cpu(device, data):
    tok, feats = data
    batches = length_grouped_batches([len(f.input_ids) for f in feats], 2, 0, shuffle=False)
    cpu_model = make_model(1).eval()
    ref = predict(cpu_model, feats, batches, [True] * len(batches), tok.pad_token_id, True, "cpu")
    model = make_model(1).eval().to(device)
    strays = guard(model, device)
    got = predict(model, feats, batches, [True] * len(batches), tok.pad_token_id, True, device)
    assert strays == []
    assert got[0] == ref[0] and got[2] == ref[2]
    assert got[1] == pytest.approx(ref[1], rel=1e-4)
    # the driver's evaluation of a merged model goes by where the model is
    assert module_device(model).type == "lazy"
    metrics = evaluate_model(model, tok, "token_classification", LABELS, EXAMPLES, 32, 4)
    assert metrics == pytest.approx(evaluate_model(cpu_model, tok, "token_classification", LABELS, EXAMPLES, 32, 4),
                                    rel=1e-4)
    assert strays == []


def test_a_batch_left_on_the_cpu_fails(device, data):
    """What the bug looked like: the model on its device, the batch not moved."""
    tok, feats = data
    model = make_model().to(device)
    batch = collate(feats, tok.pad_token_id, True)
    labels = batch.pop("labels")
    with pytest.raises(RuntimeError, match="lazy"):
        TaskLoss(model, {}, device=device)(model, model, batch, to_device(labels, device))


def test_an_anchor_left_on_the_cpu_fails(device, data):
    tok, feats = data
    model = make_model()
    loss_fn = TaskLoss(model, {"l2_sp": 0.01})  # no device: θ₀ stays where the weights were
    model.to(device)
    batch = to_device(collate(feats, tok.pad_token_id, True), device)
    labels = batch.pop("labels")
    with pytest.raises(RuntimeError, match="lazy"):
        loss_fn(model, model, batch, labels)
