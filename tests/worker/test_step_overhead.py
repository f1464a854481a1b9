"""What the workers leave out of DeepSpeed to save time, checked to change nothing they compute: the
single-rank gradient all-reduce (real DeepSpeed on CPU), DeepSpeed's import of mlflow, and torch's
per-tensor AdamW loop (the workers' optimizer is the fused kernel)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, TOY_BATCH, run_deepspeed_script

SCRIPT = (
    TOY_BATCH
    + r"""
from launcher.recipe.ds_config import build_ds_config
from launcher.nn.model import build_model, param_groups
from launcher.worker.regularize import TaskLoss
from launcher.worker.engine import skip_single_rank_allreduce, train_step

def trained(stage, skip, precision="fp32"):
    torch.manual_seed(0)
    model = build_model(MODEL, LABELS, dropout={"hidden": 0.0, "attention": 0.0})
    cfg = build_ds_config({"deepspeed": {"zero_stage": stage, "offload_optimizer": "none", "offload_params": "none",
                                         "precision": precision, "config": {}},
                           "train": {"batch_size": 2, "grad_accum": 2}, "regularization": {"max_grad_norm": 1.0}}, 1)
    opt = torch.optim.AdamW(param_groups(model, 0.01, 1e-3, 1e-2), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    if skip:
        skip_single_rank_allreduce(engine, 1, stage)
    loss_fn = TaskLoss(model, {"label_smoothing": 0.1})
    for _ in range(6):  # 3 optimizer steps of 2 micro-batches: accumulation and clipping on the path
        train_step(engine, loss_fn, dict(batch), torch.device("cpu"))
    params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return engine.enable_backward_allreduce, params

flag_kept, kept = trained(0, skip=False)
flag_skipped, skipped = trained(0, skip=True)
flag_stage1, _ = trained(1, skip=True)
_, bf16_kept = trained(0, skip=False, precision="bf16")  # DeepSpeed's bf16 optimizer reduces its own fp32 buffers
_, bf16_skipped = trained(0, skip=True, precision="bf16")
torch.manual_seed(0)
initial = dict(build_model(MODEL, LABELS, dropout={"hidden": 0.0, "attention": 0.0}).named_parameters())
print(json.dumps({"flags": [flag_kept, flag_skipped, flag_stage1],
                  "max_diff": max(float((kept[n] - skipped[n]).abs().max()) for n in kept),
                  "bf16_max_diff": max(float((bf16_kept[n] - bf16_skipped[n]).abs().max()) for n in bf16_kept),
                  "changed": sum(int(not torch.equal(kept[n], initial[n])) for n in kept), "total": len(kept)}))
"""
)


def test_one_rank_at_stage_0_skips_the_allreduce_and_trains_bit_for_bit_the_same():
    out = run_deepspeed_script(SCRIPT)
    # skipped only where it is the identity: one rank, stage 0 (ZeRO-1 builds its partitions on that path)
    assert out["flags"] == [True, False, True]
    assert out["max_diff"] == 0.0 and out["bf16_max_diff"] == 0.0  # same updates to the last bit
    assert out["changed"] >= out["total"] // 2  # and training did move the weights


def test_deepspeed_imports_without_mlflow_and_mlflow_still_imports_after():
    code = ("import json, sys\nfrom launcher.worker.engine import import_deepspeed\nds = import_deepspeed()\n"
            "before = 'mlflow' in sys.modules\nimport mlflow\n"
            "print(json.dumps({'loaded_by_deepspeed': before, 'mlflow_after': mlflow.__name__, "
            "'autotuner_sees_mlflow': sys.modules['deepspeed.autotuning.autotuner'].has_mlflow}))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"loaded_by_deepspeed": False, "mlflow_after": "mlflow", "autotuner_sees_mlflow": False}


FUSED = TOY_BATCH + r"""
from launcher.recipe.ds_config import build_ds_config
from launcher.worker.engine import adamw, train_step
from launcher.nn.model import build_model, param_groups
from launcher.worker.regularize import TaskLoss

def trained(stage, fused, precision="fp32", offload="none"):
    torch.manual_seed(0)
    model = build_model(MODEL, LABELS, dropout={"hidden": 0.0, "attention": 0.0})
    cfg = build_ds_config({"deepspeed": {"zero_stage": stage, "offload_optimizer": offload, "offload_params": "none",
                                         "precision": precision, "config": {}},
                           "train": {"batch_size": 2, "grad_accum": 1}, "regularization": {"max_grad_norm": 1.0}}, 1)
    groups = param_groups(model, 0.01, 1e-3, 1e-2)  # four groups: decay or not, encoder or head lr
    opt = adamw(groups, 1e-3) if fused else torch.optim.AdamW(groups, lr=1e-3, foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    loss_fn = TaskLoss(model, {})
    for _ in range(3):
        train_step(engine, loss_fn, dict(batch), torch.device("cpu"))
    base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    if precision == "bf16":  # the fp32 masters the optimizer stepped (what the worker saves at stage 0): the
        # bf16 copies the module runs on round near-ties either way, one bf16 ulp apart on some CPUs
        from launcher.worker.checkpoint import stage0_fp32_state_dict
        state = stage0_fp32_state_dict(engine)
        return bool(base.defaults.get("fused")), {n: state[n] for n, _ in engine.module.named_parameters()}
    from deepspeed.utils import safe_get_full_fp32_param
    # at ZeRO-3 each parameter is a partition: gathered back to compare
    full = (lambda p: safe_get_full_fp32_param(p).clone()) if stage == 3 else (lambda p: p.detach().float().clone())
    return bool(base.defaults.get("fused")), {n: full(p) for n, p in engine.module.named_parameters()}

out = {}
torch.manual_seed(0)
initial = dict(build_model(MODEL, LABELS, dropout={"hidden": 0.0, "attention": 0.0}).named_parameters())
for name, kw in {"zero0": dict(stage=0), "zero2": dict(stage=2), "zero3": dict(stage=3),
                 "zero2_offload": dict(stage=2, offload="cpu"), "zero0_bf16": dict(stage=0, precision="bf16")}.items():
    is_fused, fused = trained(fused=True, **kw)
    _, loop = trained(fused=False, **kw)
    out[name] = {"fused": is_fused,
                 "max_diff": max(float((fused[n] - loop[n]).abs().max()) for n in fused),
                 "max_update": max(float((loop[n] - initial[n].float()).abs().max()) for n in loop)}
print(json.dumps(out))
"""


def test_the_fused_adamw_steps_like_torchs_per_tensor_loop_at_every_stage():
    """The workers' AdamW is torch's fused kernel, under DeepSpeed at ZeRO-0, over ZeRO-2/3's flat
    partitions, with optimizer offload and under bf16's fp32 master weights: the same update as the
    per-tensor loop, to float rounding (under bf16 the masters are compared: on some CPUs the bf16 copies
    of the two runs round a near-tie apart, 1.2e-4 on 2026-12-03's machine while the masters agree to 3e-8)."""
    out = run_deepspeed_script(FUSED)
    assert set(out) == {"zero0", "zero2", "zero3", "zero2_offload", "zero0_bf16"}
    for name, r in out.items():
        assert r["fused"], name  # the engine steps the fused kernel, not a per-tensor copy of it
        assert r["max_update"] > 1e-3, name  # three steps at lr 1e-3 moved the weights
        # float rounding only: the fused kernel orders Adam's denominator arithmetic differently, so weights
        # whose gradients are near eps move slightly differently (plain torch, no DeepSpeed: 1.3e-5 after these
        # 3 steps, where foreach and the loop agree bit for bit); a wrong lr or a skipped group moves by ~the update
        assert r["max_diff"] <= 1e-3 * r["max_update"], (name, r)
