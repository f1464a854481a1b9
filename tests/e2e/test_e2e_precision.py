"""bf16 end to end on CPU workers (DeepSpeed's CPU accelerator runs bf16): ZeRO-3 with 2 workers, 10 steps
(bf16 is ~5× slower than fp32 on CPUs without AMX). The run trains in bf16, `best/` holds fp32 master
weights, reloads in a fresh process, and exports with fp32 parity.

It is also the suite's one ZeRO-3 launch: L2-SP acts on each rank's gradient partition
(tests/worker/test_l2sp_zero3.py checks its arithmetic in fp32, in-process) and its penalty, summed over
the ranks, is logged per evaluation. Each launch costs the suite's 2 cores ~100 CPU-s, so the other
stages' bf16 masters are checked in-process (tests/worker/test_checkpoint.py, ZeRO-0 and ZeRO-2: best/'s
weights equal DeepSpeed's fp32 masters), and the GPU suite launches bf16 at ZeRO 0, 2 and 3.

Tolerance: the workers' reported metric comes from the bf16 model (8-bit mantissa: logits off by
~1e-2), the fresh evaluation from the fp32 masters, so an argmax can flip where two labels are
within that of each other. On the 150 validation sentences (~300 entities) that moves entity F1 by
a few thousandths at most; the test allows 0.02 (two points). The driver's own evaluation of the
merged model, like the fresh one, is fp32, and those two must agree exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TOY_NER, cli, evaluate_best_in_fresh_process, train_run

from launcher.driver.startup import PHASES

pytestmark = pytest.mark.e2e

BF16_F1_TOLERANCE = 0.02
DATA = {"format": "conll", "train": str(TOY_NER / "train.conll"),
        "validation": str(TOY_NER / "validation.conll"), "test": None, "labels": None}


def test_bf16_zero3_run_keeps_fp32_best_that_reloads_and_exports(tmp_path, ray_tmp):
    from safetensors import safe_open

    stage = 3
    run = train_run(tmp_path, ray_tmp, deepspeed={"zero_stage": stage, "precision": "bf16"},
                    # 10 of the epoch's 19 steps at 2.5× the tiny recipe's rates: a bf16 step at ZeRO-3 takes
                    # ~3.3 s on 2 busy cores, and the checks below need a learned model, not a whole epoch
                    train={"epochs": 1, "max_steps": 10, "eval_every": 5, "lr": 5e-4, "head_lr": 5e-3},
                    regularization={"l2_sp": 0.01})
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "succeeded", status
    console = (tmp_path / "console.txt").read_text()
    assert f"{run.name} succeeded: eval_f1=" in console and f"zeroship export onnx {run.name}" in console
    meta = json.loads((run / "best" / "model.json").read_text())
    assert meta["training_precision"] == "bf16" and meta["zero_stage"] == stage
    with safe_open(str(run / "best" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}, dtypes

    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert all(isinstance(e["train_loss"], float) and e["train_loss"] > 0 for e in evals)
    reported = status["winner"]["value"]
    again = evaluate_best_in_fresh_process(run / "best", DATA)
    assert abs(again["eval_f1"] - reported) <= BF16_F1_TOLERANCE, (again, reported)
    merged = json.loads((run / "best" / "metrics.json").read_text())["validation"]
    assert merged["eval_f1"] == pytest.approx(again["eval_f1"], abs=1e-9)
    assert again["eval_f1"] >= 0.8  # it learned: chance is below 0.2 (test_e2e_train.random_tagger_f1)

    # L2-SP on the partitions: θ drifts from θ₀ as training goes on (evaluations at steps 5 and 10)
    assert [e["step"] for e in evals] == [5, 10], evals
    penalties = [e["train_loss_l2_sp"] for e in evals]
    assert 0 < penalties[0] < penalties[1], penalties
    # the first record says where the time before the first optimizer step went: every phase, in order
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "startup" and list(first["seconds"]) == [name for name, _, _ in PHASES]
    res = cli("zeroship", "export", "onnx", run.name, "--runs", str(run.parent), "--fp16")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    manifest = json.loads((Path(run) / "onnx" / "manifest.json").read_text())
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["parity"]["argmax_agreement"] == 1.0
    fp16 = manifest["variants"]["fp16"]["parity"]
    assert fp16["provider"] == "CPUExecutionProvider" and fp16["argmax_agreement"] >= 0.99
