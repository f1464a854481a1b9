"""bf16 end to end on CPU workers (DeepSpeed's CPU accelerator runs bf16): ZeRO-2 and ZeRO-3 with 2
workers, 1 epoch (bf16 is ~5× slower than fp32 on CPUs without AMX). The run trains in bf16, `best/`
holds fp32 master weights, reloads in a fresh process, and (ZeRO-3's) exports with fp32 parity.

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

pytestmark = pytest.mark.e2e

BF16_F1_TOLERANCE = 0.02
DATA = {"format": "conll", "train": str(TOY_NER / "train.conll"),
        "validation": str(TOY_NER / "validation.conll"), "test": None, "labels": None}


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_run_keeps_fp32_best_that_reloads_and_exports(stage, tmp_path, ray_tmp):
    from safetensors import safe_open

    run = train_run(tmp_path, ray_tmp, deepspeed={"zero_stage": stage, "precision": "bf16"}, train={"epochs": 1})
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "succeeded", status
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

    if stage == 2:  # best/ is fp32 safetensors either way: the export does not depend on the stage
        return
    res = cli("zeroship", "export", "onnx", run.name, "--runs", str(run.parent), "--fp16")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    manifest = json.loads((Path(run) / "onnx" / "manifest.json").read_text())
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["parity"]["argmax_agreement"] == 1.0
    fp16 = manifest["variants"]["fp16"]["parity"]
    assert fp16["provider"] == "CPUExecutionProvider" and fp16["argmax_agreement"] >= 0.99
