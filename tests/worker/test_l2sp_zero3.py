"""L2-SP under ZeRO-3, where every rank holds only a partition of each parameter: real DeepSpeed
(gloo, CPU) against a plain PyTorch loop with the penalty in the loss (the stage 0–2 form, itself
checked against an independent formula in test_regularize.py)."""

from __future__ import annotations

import pytest
from conftest import TOY_BATCH, run_deepspeed_script

pytestmark = pytest.mark.e2e

SCRIPT = TOY_BATCH + r"""
from launcher.recipe.ds_config import build_ds_config
from launcher.nn.model import build_model, param_groups
from launcher.worker.regularize import PartitionedL2SP, TaskLoss

labels = batch.pop("labels")
lr, steps = 0.05, 4

def make():
    torch.manual_seed(0)
    return build_model(MODEL, LABELS, dropout={"hidden": 0.0, "attention": 0.0})

def compare(alpha, z3_alpha):
    ref = make()
    # SGD: each update is linear in the gradient, so the two forms must agree to rounding (Adam's
    # g/√v would magnify rounding on parameters the loss does not move, like the key bias)
    opt = torch.optim.SGD(param_groups(ref, 0.0, lr, None), lr=lr)
    loss_fn, ref_pen = TaskLoss(ref, {"l2_sp": alpha}), []
    for _ in range(steps):
        loss, parts = loss_fn(ref, ref, batch, labels)
        ref_pen.append(float(parts.get("l2_sp", 0.0)))
        opt.zero_grad(); loss.backward(); opt.step()

    model = make()
    cfg = build_ds_config({"deepspeed": {"zero_stage": 3, "offload_optimizer": "none", "offload_params": "none",
                                         "precision": "fp32", "config": {}},
                           "train": {"batch_size": 2, "grad_accum": 1}, "regularization": {"max_grad_norm": 0.0}}, 1)
    opt = torch.optim.SGD(param_groups(model, 0.0, lr, None), lr=lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    loss_fn = TaskLoss(model, {"l2_sp": z3_alpha}, partitioned=True)
    z3, pen = PartitionedL2SP(engine.module, z3_alpha), []
    for _ in range(steps):
        loss, parts = loss_fn(engine.module, engine, batch, labels)
        assert "l2_sp" not in parts  # not in the loss under ZeRO-3
        engine.backward(loss)
        pen.append(float(z3.apply()))
        engine.step()
    diffs = {}
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        ref_params = dict(ref.named_parameters())
        for name, p in params.items():
            diffs[name] = float((p.detach() - ref_params[name].detach()).abs().max())
    return {"max_diff": max(diffs.values()), "ref_pen": ref_pen, "z3_pen": pen,
            "worst": max(diffs, key=diffs.get)}

# alpha on both sides, and (the control) alpha on the plain side only: one process, two trajectories each
print(json.dumps({"same": compare(20.0, 20.0), "control": compare(20.0, 0.0)}))
"""


@pytest.fixture(scope="module")
def runs() -> dict:
    """Both comparisons from one DeepSpeed process (its imports are most of the time)."""
    return run_deepspeed_script(SCRIPT)


def test_l2_sp_under_zero3_matches_the_loss_term_form(runs):
    got = runs["same"]  # α = 20 in both
    # same trajectory as the plain loop with α/2·‖θ−θ₀‖² in the loss
    assert got["max_diff"] < 1e-4, got
    assert got["ref_pen"][0] == 0.0 and got["ref_pen"][-1] > 1e-3  # θ moves away from θ₀
    for a, b in zip(got["ref_pen"], got["z3_pen"]):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-9)


def test_without_l2_sp_the_zero3_trajectory_differs(runs):
    # the comparison above can fail: with α = 0 on the DeepSpeed side only, the runs part ways
    got = runs["control"]
    assert got["max_diff"] > 1e-3 and got["z3_pen"] == [0.0] * len(got["z3_pen"])
