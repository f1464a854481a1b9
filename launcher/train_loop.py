"""What every Ray Train worker runs: data → model → DeepSpeed → epochs → evaluate → checkpoint.

Everything the worker needs arrives in `config` (the resolved recipe, the label set, the parsed
examples, a handle to the driver's progress board); nothing is read from module globals.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from typing import Any

CKPT_TAG = "zero"
STATE_FILE = "zeroship_state.json"


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)
    return fn


def train_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger
    from transformers import AutoTokenizer

    from launcher.data import collate, examples_from_dicts, length_grouped_batches, shard_batches
    from launcher.ds_config import build_ds_config
    from launcher.evaluate import encode, predict, score
    from launcher.model import apply_freeze, apply_lora, build_model, param_groups, warm_start
    from launcher.recipe import resolve_encoder
    from launcher.regularize import PartitionedL2SP, TaskLoss

    # ---------------------------------------------------------------- setup
    recipe, labels, board = config["recipe"], config["labels"], config.get("progress")
    mcfg, dcfg, tcfg, rcfg = recipe["model"], recipe["data"], recipe["train"], recipe["regularization"]
    task, metric, mode = mcfg["task"], config["metric"], config["mode"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(recipe["scaling"]["cpus_per_worker"])))
    ds_logger.setLevel("WARNING")
    seed_everything(tcfg["seed"])

    def emit(event: dict, wait: bool = False) -> None:
        if board is not None and rank == 0:
            ref = board.push.remote({"trial": config.get("trial", ""), **event})
            if wait:
                import ray
                ray.get(ref)

    # ---------------------------------------------------------------- data
    tokenizer = AutoTokenizer.from_pretrained(mcfg.get("init_from") or resolve_encoder(mcfg["encoder"]))
    train_ex = examples_from_dicts(config["data"]["train"])
    val_ex = examples_from_dicts(config["data"]["validation"])
    enc = dict(task=task, tokenizer=tokenizer, labels=labels, max_length=dcfg["max_length"], stride=dcfg["stride"])
    train_feats = encode(examples=train_ex, **enc)
    val_feats = encode(examples=val_ex, **enc)
    val_batches, val_real = shard_batches(
        length_grouped_batches([len(f.input_ids) for f in val_feats], tcfg["batch_size"], 0, shuffle=False),
        rank, world)

    def epoch_batches(epoch: int) -> list[list[int]]:
        lengths = [len(f.input_ids) for f in train_feats]
        batches = length_grouped_batches(lengths, tcfg["batch_size"], tcfg["seed"] + epoch, shuffle=True)
        return shard_batches(batches, rank, world)[0]

    micro_per_epoch = len(epoch_batches(0))
    steps_per_epoch = max(1, micro_per_epoch // tcfg["grad_accum"])
    total_steps = steps_per_epoch * tcfg["epochs"]

    # ---------------------------------------------------------------- model + DeepSpeed
    if mcfg.get("init_from"):  # warm start from an earlier run's winner
        model = warm_start(mcfg["init_from"], labels, mcfg["head"], mcfg["init_from_head"])
    else:
        model = build_model(mcfg, labels, dropout={"hidden": rcfg.get("hidden_dropout"),
                                                   "attention": rcfg.get("attention_dropout")})
    apply_freeze(model, mcfg["freeze"])
    if mcfg.get("lora"):
        apply_lora(model, mcfg["lora"])
    zero3 = recipe["deepspeed"]["zero_stage"] == 3
    task_loss = TaskLoss(model, rcfg, partitioned=zero3)  # takes θ₀ for L2-SP before DeepSpeed touches the weights
    with_type_ids = model.uses_token_type_ids
    optimizer = torch.optim.AdamW(param_groups(model, rcfg["weight_decay"], tcfg["lr"], tcfg.get("head_lr"),
                                               tcfg.get("layer_decay", 1.0)),
                                  lr=tcfg["lr"])
    warmup = int(tcfg["warmup_ratio"] * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg["schedule"], warmup, total_steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=build_ds_config(recipe, world))
    l2_sp_z3 = PartitionedL2SP(engine.module, rcfg["l2_sp"]) if zero3 and rcfg.get("l2_sp") else None

    def evaluate() -> dict[str, float]:
        engine.eval()
        preds, loss_sum, count = predict(engine, val_feats, val_batches, val_real,
                                         tokenizer.pad_token_id, with_type_ids)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (preds, loss_sum, count))
        engine.train()
        all_preds: dict = {}
        for p, _, _ in gathered:
            all_preds.update(p)
        return score(task, labels, val_ex, val_feats, all_preds,
                     sum(g[1] for g in gathered), sum(g[2] for g in gathered))

    # ---------------------------------------------------------------- checkpoint + report
    best_value: float | None = None
    bad_evals = 0
    es = tcfg.get("early_stopping")

    window: dict[str, Any] = {"times": [], "losses": [], "samples": 0, "tokens": 0, "parts": {}}

    def train_stats() -> dict[str, float]:
        times = sorted(window["times"])
        total = sum(times) or 1e-9
        stats = {"train_loss": sum(window["losses"]) / max(1, len(window["losses"])),
                 "train_step_s": times[len(times) // 2] if times else 0.0,
                 "train_samples_per_s": window["samples"] * world / total,
                 "train_tokens_per_s": window["tokens"] * world / total,
                 "lr": scheduler.get_last_lr()[0]}
        if torch.cuda.is_available():  # the GPU benchmark reads it (benchmarks/gpu.sh)
            stats["train_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        for name, values in window["parts"].items():  # each loss term, so its effect can be seen
            stats[f"train_loss_{name}"] = sum(values) / max(1, len(values))
        window.update(times=[], losses=[], samples=0, tokens=0, parts={})
        return stats

    def checkpoint_and_report(metrics: dict[str, float], epoch: int, step: int, next_pos: tuple[int, int]) -> bool:
        """Every rank saves its ZeRO shard and reports; returns True when early stopping says stop.

        `next_pos` is (epoch, micro-batch) where training continues if it resumes from this checkpoint.
        """
        nonlocal best_value, bad_evals
        metrics = {**metrics, **train_stats()}
        value = metrics[metric]
        better = best_value is None or (
            value > best_value + (es["min_delta"] if es else 0) if mode == "max"
            else value < best_value - (es["min_delta"] if es else 0))
        if better:
            best_value, bad_evals = value, 0
        else:
            bad_evals += 1
        stop = [bool(es and bad_evals >= es["patience"])]
        dist.broadcast_object_list(stop, src=0)  # rank 0 decides; every rank stops at the same step
        record = {**metrics, "epoch": epoch, "step": step, "trial": config.get("trial", "")}
        tmp = tempfile.mkdtemp(prefix="zeroship-ckpt-")
        try:
            resume = {"epoch": epoch, "step": step, "next_epoch": next_pos[0], "next_micro": next_pos[1],
                      "best_value": best_value, "bad_evals": bad_evals}
            engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"zeroship_resume": resume})
            # each rank's RNG, so dropout after a resume repeats the uninterrupted run exactly
            torch.save({"torch": torch.get_rng_state()}, os.path.join(tmp, f"rng_rank{rank}.pt"))
            if rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as fh:
                    json.dump({"epoch": epoch, "step": step, "metrics": metrics, "labels": labels,
                               "zero_stage": recipe["deepspeed"]["zero_stage"]}, fh)
            emit({"kind": "eval", **record}, wait=True)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return stop[0]

    # ---------------------------------------------------------------- resume (after a worker failure)
    step, start_epoch, start_micro = 0, 1, 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            _, client = engine.load_checkpoint(folder, tag=CKPT_TAG)  # model, optimizer, scheduler
            rng = torch.load(os.path.join(folder, f"rng_rank{rank}.pt"), weights_only=True)
        torch.set_rng_state(rng["torch"])
        state = client["zeroship_resume"]
        step, start_epoch, start_micro = state["step"], state["next_epoch"], state["next_micro"]
        best_value, bad_evals = state["best_value"], state["bad_evals"]
    fault = _fault_hook(rank)

    # ---------------------------------------------------------------- train
    emit({"kind": "start", "total_steps": total_steps, "world": world, "examples": len(train_ex),
          "resumed_from_step": step if restored is not None else None})
    if mcfg.get("init_from") and restored is None:  # where the parent leaves off, before any step
        emit({"kind": "initial", **evaluate(), "epoch": 0, "step": 0}, wait=True)
    stopped, started = None, time.time()
    eval_every = tcfg["eval_every"]
    last_eval_step = step if restored is not None else -1
    micro_total = steps_per_epoch * tcfg["grad_accum"]
    for epoch in range(start_epoch, tcfg["epochs"] + 1):
        engine.train()
        step_started = time.perf_counter()
        for micro, batch_ids in enumerate(epoch_batches(epoch)):
            if micro >= micro_total:
                break  # keep every rank and epoch at the same number of optimizer steps
            if epoch == start_epoch and micro < start_micro:
                continue  # consumed before the checkpoint this run resumed from
            batch = collate([train_feats[i] for i in batch_ids], tokenizer.pad_token_id, with_type_ids)
            window["samples"] += len(batch_ids)
            window["tokens"] += int(batch["attention_mask"].sum())
            labels_t = batch.pop("labels")
            loss, parts = task_loss(engine.module, engine, batch, labels_t)
            for name, value in parts.items():
                window["parts"].setdefault(name, []).append(value)
            engine.backward(loss)
            if l2_sp_z3 is not None and engine.is_gradient_accumulation_boundary():
                window["parts"].setdefault("l2_sp", []).append(l2_sp_z3.apply())
            engine.step()
            if (micro + 1) % tcfg["grad_accum"]:
                continue  # DeepSpeed accumulates; an optimizer step happens every grad_accum micro-batches
            step += 1
            if fault is not None and step == fault[0]:
                # Ray Train's controller collects reports every 2 s: a crash sooner than that after
                # a checkpoint can lose it (seen in CI: resumed from step 5, not 10). Wait it out, so
                # the test's resume point is deterministic.
                time.sleep(3)
                with open(fault[1], "w") as fh:  # the restarted worker sees it and runs on
                    fh.write(str(time.time()))  # when it died, to measure the time to resume
                os._exit(17)  # test-only: die hard, as a crashed or preempted worker would
            now = time.perf_counter()
            window["times"].append(now - step_started)
            window["losses"].append(float(loss.detach()))
            if rank == 0 and (step % max(1, total_steps // 100) == 0 or step == total_steps):
                emit({"kind": "step", "step": step, "epoch": epoch, "loss": float(loss.detach()),
                      "lr": scheduler.get_last_lr()[0], "elapsed": time.time() - started})
            if isinstance(eval_every, int) and step % eval_every == 0:
                last_eval_step = step
                nxt = (epoch, micro + 1) if micro + 1 < micro_total else (epoch + 1, 0)
                if checkpoint_and_report(evaluate(), epoch, step, nxt):
                    stopped = f"early stopping: {metric} did not improve for {es['patience']} evaluations"
                    break
            step_started = time.perf_counter()  # step time excludes evaluation and checkpointing
        if stopped:
            break
        if eval_every == "epoch" or (epoch == tcfg["epochs"] and last_eval_step != step):
            last_eval_step = step
            if checkpoint_and_report(evaluate(), epoch, step, (epoch + 1, 0)):
                stopped = f"early stopping: {metric} did not improve for {es['patience']} evaluations"
                break
    emit({"kind": "end", "step": step, "stop_reason": stopped or "completed all epochs"}, wait=True)


def _fault_hook(rank: int) -> tuple[int, str] | None:
    """Test-only fault injection: ZEROSHIP_FAULT="rank:step:marker-file" makes that rank exit hard
    when it reaches that optimizer step, once (the marker file records that it happened)."""
    spec = os.environ.get("ZEROSHIP_FAULT")
    if not spec:
        return None
    r, s, marker = spec.split(":", 2)
    if int(r) != rank or os.path.exists(marker):
        return None
    return int(s), marker
