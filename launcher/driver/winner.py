"""The winner: the best reported checkpoint, merged from its ZeRO shards into `best/` (fp32), checked
by evaluating the merged model again."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.driver.plan import Plan
from launcher.eval.ranking import best
from launcher.recipe.schema import Recipe
from launcher.runs.registry import Run, atomic_write_json
from launcher.worker.checkpoint import merged_state_dict, read_state
from zeroship.errors import RunFailed


@dataclass(frozen=True)
class Winner:
    """The checkpoint a run keeps, however it was chosen (one run, a sweep, k-fold): status.json's
    `winner` and best/metrics.json's `reported`."""

    trial: str | None  # None: a single run; a sweep's trial; "refit" after k-fold
    epoch: int
    step: int
    metric: str
    value: float
    params: dict | None = None  # a sweep's point
    cv_mean: float | None = None  # k-fold: the point's mean and spread over its folds
    cv_std: float | None = None

    @classmethod
    def reported(cls, event: dict, metric: str, trial: str | None = None, **more: Any) -> Winner:
        """From a reported evaluation (an `eval` event or a checkpoint's metrics)."""
        return cls(trial=trial, epoch=event["epoch"], step=event["step"], metric=metric, value=event[metric], **more)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "trial"}


# ------------------------------------------------------------------ winner → best/
def pick_winner(result, metric: str, mode: str) -> tuple[Any, dict]:
    candidates = [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if metric in m]
    if not candidates:
        raise RunFailed("training finished without a reported checkpoint")
    return best(candidates, mode, key=lambda cm: cm[1][metric])


def write_best(run: Run, recipe: Recipe, labels: list[str], ckpt_dir: Path, winner: Winner,
               plan: Plan) -> dict:
    """Merge the winning shards into best/ (fp32, whatever the training precision) and check the
    merged model reproduces the metric, evaluating it on the driver's GPU when it has one."""
    from transformers import AutoTokenizer

    from launcher.eval.evaluate import evaluate_model
    from launcher.nn.device import driver_device
    from launcher.nn.model import apply_lora, build_model, merge_lora, warm_start

    m = recipe.model
    if m.init_from:  # same shapes as the parent's encoder, this run's head
        model = warm_start(m.init_from, labels, m.head.model_dump(mode="json"), m.init_from_head, m.casing)
    else:
        model = build_model(m.model_dump(mode="json"), labels, pretrained=False)
    if m.lora:
        apply_lora(model, m.lora.model_dump(mode="json"))
    with run.logs.quiet() if run.logs else contextlib.nullcontext():  # zero_to_fp32 prints to stdout
        state = merged_state_dict(ckpt_dir)  # verifies the checkpoint's signatures first
    ckpt_state = read_state(ckpt_dir)  # epoch, step, ZeRO stage, precision of the winning checkpoint
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent = {n for n, _ in model.named_parameters()} | set(model.state_dict())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise RunFailed(f"merged checkpoint does not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    model = merge_lora(model.eval()).to(driver_device())  # best/ holds a plain encoder: export needs no peft
    tokenizer = AutoTokenizer.from_pretrained(plan.encoder_source)
    dcfg = recipe.data
    metrics, reports = {}, {}
    for split in ("validation", "test"):
        if split in plan.dataset.splits:
            result = evaluate_model(model, tokenizer, model.task, labels, plan.dataset.splits[split].examples,
                                    dcfg.max_length, dcfg.stride, with_report=True)
            reports[split] = result.pop("report")
            metrics[split] = result
    metrics["reported"] = winner.to_json()
    tmp = run.dir / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp, tokenizer=tokenizer, extra={
        "max_length": dcfg.max_length, "stride": dcfg.stride, "run": run.id,
        "metric": recipe.train.metric or winner.metric,
        # the precision it was trained in; the weights in best/ are the fp32 masters
        "training_precision": ckpt_state.get("precision", recipe.deepspeed.precision),
        "zero_stage": ckpt_state["zero_stage"]})
    atomic_write_json(tmp / "metrics.json", metrics)
    atomic_write_json(tmp / "report.json", reports)
    shutil.rmtree(run.best_dir, ignore_errors=True)
    os.replace(tmp, run.best_dir)
    run.push("best")  # before the status says succeeded, so a reader of the URI never sees half of it
    return metrics
