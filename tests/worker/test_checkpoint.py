"""best/ holds fp32 master weights whatever the training precision: at ZeRO-0, where DeepSpeed's
zero_to_fp32 does not reach, the worker writes them itself (launcher.worker.checkpoint); at ZeRO-1–3
they come from the optimizer's fp32 partitions through zero_to_fp32. Real DeepSpeed on one CPU process
(gloo) trains a few bf16 steps; the weights kept must be the optimizer's fp32 masters, not the bf16
copies the model ran on upcast, and must come back from the checkpoint folder unchanged.
(tests/e2e/test_e2e_precision.py runs bf16 through a whole launch at ZeRO-3.)"""

from __future__ import annotations

import pytest
from conftest import run_deepspeed_script

pytestmark = pytest.mark.e2e

SCRIPT = r"""
import tempfile
from launcher.worker.checkpoint import (CKPT_TAG, STATE_FILE, merged_state_dict, save_stage0_fp32,
                                       stage0_fp32_state_dict)
from launcher.recipe.ds_config import build_ds_config
from launcher.worker.engine import adamw
from launcher.nn.model import build_model, param_groups, trainable_params


def check(precision, stage):
    torch.manual_seed(0)
    model = build_model(MODEL, ["O", "B-PER", "I-PER"])
    cfg = build_ds_config({"deepspeed": {"zero_stage": stage, "offload_optimizer": "none", "offload_params": "none",
                                         "precision": precision, "config": {}},
                           "train": {"batch_size": 2, "grad_accum": 1}, "regularization": {"max_grad_norm": 1.0}}, 1,
                          trainable_params(model))  # as the workers build it
    opt = adamw(param_groups(model, 0.0, 1e-3, None), 1e-3)  # the workers' optimizer
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (2, 9))
    buffers = []  # the gradient buffers DeepSpeed allocates for its reduce bucket (launcher.recipe.ds_config)
    if stage:  # each backward sets them up and releases them at its end: seen as they are set up
        setup = engine.optimizer.setup_buckets

        def watched():
            setup()
            buffers.extend(b.numel() for bucket in engine.optimizer.ipg_buckets.values() for b in bucket.buffer)
        engine.optimizer.setup_buckets = watched
    for _ in range(3):
        loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids)).float().logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
    folder = tempfile.mkdtemp()
    if stage == 0:  # what the worker writes at stage 0 (launcher.worker.train_loop.save_checkpoint)
        state = stage0_fp32_state_dict(engine)
        masters = {id(lp): hp for g16, g32 in zip(getattr(engine.optimizer, "fp16_groups", []),
                                                  getattr(engine.optimizer, "fp32_groups", []))
                   for lp, hp in zip(g16, g32)}
        save_stage0_fp32(engine, folder)
    else:  # ZeRO-1-3: DeepSpeed's own checkpoint; its public accessor gives each parameter's fp32 master
        from deepspeed.utils import safe_get_full_fp32_param
        masters = {id(p): safe_get_full_fp32_param(p) for p in engine.module.parameters() if p.requires_grad}
        masters = {k: v for k, v in masters.items() if v is not None}
        engine.save_checkpoint(folder, tag=CKPT_TAG)
    json.dump({"zero_stage": stage}, open(os.path.join(folder, STATE_FILE), "w"))
    from launcher.worker.signing import load_key, sign_checkpoint
    sign_checkpoint(folder, load_key(), 0)  # the driver merges only signed checkpoints
    back = merged_state_dict(folder)
    if stage:
        state = back
    out = {"module_dtype": str(next(engine.module.parameters()).dtype), "masters": len(masters),
           "params": sum(p.numel() for p in model.parameters())}
    if stage:
        out["bucket"], out["bucket_buffers"] = engine.optimizer.reduce_bucket_size, buffers
    for name, p in engine.module.named_parameters():
        if name != "classifier.weight":
            continue
        w = state[name]
        out["dtype"] = str(w.dtype)
        out["equals_master"] = bool(torch.equal(w, masters[id(p)].cpu())) if masters else None
        out["equals_module"] = bool(torch.equal(w, p.detach().float().cpu()))
        out["bf16_representable"] = bool(torch.equal(w, w.bfloat16().float()))
    out["round_trip"] = sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    out["all_float_fp32"] = all(v.dtype == torch.float32 for v in back.values() if v.is_floating_point())
    return out

# every configuration in one process (its imports are most of the time); each starts from seed 0
print(json.dumps({f"{p}-{s}": check(p, s) for p, s in (("bf16", 0), ("bf16", 2), ("fp32", 0))}))
"""


@pytest.fixture(scope="module")
def runs() -> dict:
    return run_deepspeed_script(SCRIPT)


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_keeps_the_fp32_masters(runs, stage):
    got = runs[f"bf16-{stage}"]
    assert got["module_dtype"] == "torch.bfloat16" and got["masters"] > 0  # DeepSpeed's mixed-precision wrapper
    assert got["dtype"] == "torch.float32" and got["equals_master"]
    # the masters carry bits the bf16 copy cannot hold: an upcast of the module would lose them
    assert not got["bf16_representable"] and not got["equals_module"]
    assert got["round_trip"] and got["all_float_fp32"]


def test_zero2_reserves_a_gradient_bucket_of_the_models_size_not_deepspeeds_default(runs):
    got = runs["bf16-2"]
    # every parameter trains here; DeepSpeed's default would reserve 500,000,000 elements (on a GPU: 954 MB in bf16)
    assert got["bucket"] == got["params"] and 0 < got["params"] < 500_000_000
    assert got["bucket_buffers"] and all(n <= got["params"] for n in got["bucket_buffers"]), got


def test_fp32_stage0_keeps_the_module_weights(runs):
    got = runs["fp32-0"]
    assert got["module_dtype"] == "torch.float32" and got["masters"] == 0
    assert got["equals_module"] and got["round_trip"] and got["all_float_fp32"]
