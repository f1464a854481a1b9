"""What every Ray Train worker runs: data → model → DeepSpeed → epochs → evaluate → checkpoint.

Everything the worker needs arrives in `config` (the resolved recipe, the label set, the parsed
examples, a handle to the driver's progress board); nothing is read from module globals.

Device and precision: the worker computes on `launcher.device.worker_device()`; every batch reaches
it through `train_step` / `evaluate.predict` (`to_device`), and θ₀ for L2-SP is kept there. DeepSpeed
owns precision (its `bf16`/`fp16` sections, loss scaling for fp16); losses and metrics are fp32. The
loss terms stay on the device between logging points (`LossWindow`), so a step never waits on the GPU.
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

from launcher.checkpoint import CKPT_TAG, STATE_FILE


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


class LossWindow:
    """Running sums of the loss terms since the last evaluation, kept on the device (adding to them
    queues a kernel; nothing waits for the GPU until `read`, once per logging point)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, terms: dict[str, Any]) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1

    def read(self) -> dict[str, float]:
        """Means since the last read (one host transfer for all terms), then start afresh."""
        import torch

        names = list(self.sums)
        values = torch.stack([self.sums[n].float() for n in names]).cpu().tolist() if names else []
        means = {n: v / self.counts[n] for n, v in zip(names, values)}
        self.sums, self.counts = {}, {}
        return means


def bound_collective_timeouts(seconds: int) -> None:
    """Make every process group this worker creates time out after `seconds`. Ray Train gives the
    default group the recipe's timeout, but DeepSpeed builds its own groups (ZeRO's data-parallel
    group) with `new_group()`, which takes torch's backend default (30 min gloo, 10 min NCCL):
    a hung rank would stall the others that long. Call before `deepspeed.initialize`."""
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timedelta(seconds=seconds)


def import_deepspeed():
    """`import deepspeed` without its autotuner's `import mlflow`: DeepSpeed imports the autotuner at
    import time, and it loads mlflow when installed (3.2 s of a worker's start-up, measured with
    `python -X importtime`) for an autotuning run zeroship never makes. Workers never log to MLflow
    (the driver does, launcher.observe), and the block lasts only for this import."""
    import sys

    block = "deepspeed" not in sys.modules and "mlflow" not in sys.modules
    if block:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # makes `import mlflow` raise ImportError
    try:
        import deepspeed
    finally:
        if block:
            del sys.modules["mlflow"]
    return deepspeed


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU workers. It serves
    only `inference_all_reduce` (tensor-parallel inference), which training never calls, and building
    it costs 30-80 s of `deepspeed.initialize` on each node's first launch, again whenever another
    environment's build replaced it in the shared `~/.cache/torch_extensions` (measured, STACK.md).
    DeepSpeed keeps `deepspeed.ops.__compatible_ops__` as one dict so that edits to it persist."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def skip_single_rank_allreduce(engine, world: int, stage: int) -> None:
    """With one rank and no ZeRO partitioning, averaging gradients over the ranks is the identity,
    but DeepSpeed still flattens every gradient into buckets, "all-reduces" them and copies them back:
    60 ms of `aten::cat` and 12 ms of copies per step on the quickstart model (benchmarks/
    profile_step.py, RESULTS.md). ZeRO-1/2/3 optimizers build their fp32 partitions on that path, so only stage 0."""
    if world == 1 and stage == 0:
        engine.enable_backward_allreduce = False


def train_step(engine, task_loss, batch: dict[str, Any], device, l2_sp_z3=None) -> dict[str, Any]:
    """One micro-batch: move it to the worker's device, loss, backward, DeepSpeed step (which only
    updates at accumulation boundaries). Returns the loss terms as detached device tensors."""
    from launcher.device import to_device

    batch = to_device(batch, device)
    labels = batch.pop("labels")
    loss, parts = task_loss(engine.module, engine, batch, labels)
    engine.backward(loss)
    if l2_sp_z3 is not None and engine.is_gradient_accumulation_boundary():
        parts["l2_sp"] = l2_sp_z3.apply()  # ZeRO-3: on each rank's gradient partition
    engine.step()
    return {"loss": loss.detach().float(), **parts}


def train_worker(config: dict[str, Any]) -> None:
    stamps = {"worker": time.time()}  # start-up phases (launcher.startup), reported after the first step
    deepspeed = import_deepspeed()
    import ray.train
    import torch
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger
    from transformers import AutoTokenizer

    from launcher import zero_auto
    from launcher.checkpoint import save_stage0_fp32
    from launcher.data import examples_from_dicts
    from launcher.device import worker_device
    from launcher.ds_config import build_ds_config
    from launcher.evaluate import predict, score
    from launcher.features import collate, encode, length_grouped_batches, shard_batches
    from launcher.model import apply_freeze, apply_lora, build_model, param_groups, warm_start
    from launcher.recipe import resolve_encoder
    from launcher.regularize import PartitionedL2SP, TaskLoss
    from launcher.signing import sign_checkpoint, verify_checkpoint, worker_key

    stamps["imports"] = time.time()

    # ---------------------------------------------------------------- setup
    recipe, labels, board = config["recipe"], config["labels"], config.get("progress")
    mcfg, dcfg, tcfg, rcfg = recipe["model"], recipe["data"], recipe["train"], recipe["regularization"]
    task, metric, mode = mcfg["task"], config["metric"], config["mode"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    bound_collective_timeouts(recipe["scaling"]["timeout_s"])
    skip_shm_comm_build()
    torch.set_num_threads(max(1, int(recipe["scaling"]["cpus_per_worker"])))
    ds_logger.setLevel("WARNING")
    seed_everything(tcfg["seed"])
    signing_key = worker_key()

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
    stamps["data"] = time.time()
    val_batches, val_real = shard_batches(
        length_grouped_batches([len(f.input_ids) for f in val_feats], tcfg["batch_size"], 0, shuffle=False),
        rank, world)

    def epoch_batches(epoch: int) -> list[list[int]]:
        lengths = [len(f.input_ids) for f in train_feats]
        batches = length_grouped_batches(lengths, tcfg["batch_size"], tcfg["seed"] + epoch, shuffle=True)
        return shard_batches(batches, rank, world)[0]

    micro_per_epoch = len(epoch_batches(0))
    steps_per_epoch = max(1, micro_per_epoch // tcfg["grad_accum"])
    total_steps = tcfg.get("max_steps") or steps_per_epoch * tcfg["epochs"]  # max_steps overrides epochs
    last_epoch = -(-total_steps // steps_per_epoch)

    # ---------------------------------------------------------------- model + DeepSpeed
    if mcfg.get("init_from"):  # warm start from an earlier run's winner
        model = warm_start(mcfg["init_from"], labels, mcfg["head"], mcfg["init_from_head"])
    else:
        model = build_model(mcfg, labels, dropout={"hidden": rcfg.get("hidden_dropout"),
                                                   "attention": rcfg.get("attention_dropout")})
    apply_freeze(model, mcfg["freeze"])
    if mcfg.get("lora"):
        apply_lora(model, mcfg["lora"])
    stamps["model"] = time.time()
    zero_choice = None
    if recipe["deepspeed"]["zero_stage"] == "auto":  # every rank computes the same choice
        recipe, zero_choice = zero_auto.resolve(recipe, model, *zero_auto.worker_memory(device))
    stage, precision = recipe["deepspeed"]["zero_stage"], recipe["deepspeed"]["precision"]
    zero3 = stage == 3
    # takes θ₀ for L2-SP before DeepSpeed touches (casts, moves, partitions) the weights
    task_loss = TaskLoss(model, rcfg, partitioned=zero3, device=device)
    with_type_ids = model.uses_token_type_ids
    optimizer = torch.optim.AdamW(param_groups(model, rcfg["weight_decay"], tcfg["lr"], tcfg.get("head_lr"),
                                               tcfg.get("layer_decay", 1.0)),
                                  lr=tcfg["lr"])
    warmup = int(tcfg["warmup_ratio"] * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg["schedule"], warmup, total_steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=build_ds_config(recipe, world))
    skip_single_rank_allreduce(engine, world, stage)
    l2_sp_z3 = PartitionedL2SP(engine.module, rcfg["l2_sp"], device) if zero3 and rcfg.get("l2_sp") else None

    def evaluate() -> dict[str, float]:
        engine.eval()
        preds, loss_sum, count = predict(engine, val_feats, val_batches, val_real,
                                         tokenizer.pad_token_id, with_type_ids, device)
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

    window: dict[str, Any] = {"times": [], "samples": 0, "tokens": 0}
    losses = LossWindow()

    def train_stats() -> dict[str, float]:
        times = sorted(window["times"])
        total = sum(times) or 1e-9
        terms = losses.read()
        stats = {"train_loss": terms.pop("loss", 0.0),
                 "train_step_s": times[len(times) // 2] if times else 0.0,
                 "train_samples_per_s": window["samples"] * world / total,
                 "train_tokens_per_s": window["tokens"] * world / total,
                 "lr": scheduler.get_last_lr()[0]}
        if torch.cuda.is_available():  # the GPU benchmark reads it (benchmarks/gpu.sh)
            stats["train_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        for name, value in terms.items():  # each loss term, so its effect can be seen
            stats[f"train_loss_{name}"] = value
        window.update(times=[], samples=0, tokens=0)
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
                if stage == 0:  # fp32 masters for best/ (see launcher.checkpoint)
                    save_stage0_fp32(engine, tmp)
                with open(os.path.join(tmp, STATE_FILE), "w") as fh:
                    json.dump({"epoch": epoch, "step": step, "metrics": metrics, "labels": labels,
                               "zero_stage": stage, "precision": precision}, fh)
            sign_checkpoint(tmp, signing_key, rank)  # last: it covers every file this rank wrote
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
            verify_checkpoint(folder, signing_key)  # before DeepSpeed unpickles anything in it
            _, client = engine.load_checkpoint(folder, tag=CKPT_TAG)  # model, optimizer, scheduler
            rng = torch.load(os.path.join(folder, f"rng_rank{rank}.pt"), weights_only=True)
        torch.set_rng_state(rng["torch"])
        state = client["zeroship_resume"]
        step, start_epoch, start_micro = state["step"], state["next_epoch"], state["next_micro"]
        best_value, bad_evals = state["best_value"], state["bad_evals"]
    fault = FaultHook.from_env(rank)
    stamps["engine"] = time.time()

    # ---------------------------------------------------------------- train
    emit({"kind": "start", "total_steps": total_steps, "world": world, "examples": len(train_ex),
          "resumed_from_step": step if restored is not None else None, "zero_auto": zero_choice})
    initial = None
    if mcfg.get("init_from") and restored is None:  # where the parent leaves off, before any step
        initial = {"kind": "initial", **evaluate(), "epoch": 0, "step": 0}  # sent after the startup record
    resumed_from = step if restored is not None else None

    def first_step_done() -> None:  # the start-up record comes first in metrics.jsonl
        stamps["first_step"] = time.time()
        emit({"kind": "startup", "stamps": stamps, "resumed_from_step": resumed_from})
        if initial is not None:
            emit(initial, wait=True)
    stopped, started = None, time.time()
    eval_every = tcfg["eval_every"]
    last_eval_step = step if restored is not None else -1
    micro_total = steps_per_epoch * tcfg["grad_accum"]
    for epoch in range(start_epoch, last_epoch + 1):
        engine.train()
        step_started = time.perf_counter()
        for micro, batch_ids in enumerate(epoch_batches(epoch)):
            if micro >= micro_total or step >= total_steps:
                break  # keep every rank and epoch at the same number of optimizer steps
            if epoch == start_epoch and micro < start_micro:
                continue  # consumed before the checkpoint this run resumed from
            batch = collate([train_feats[i] for i in batch_ids], tokenizer.pad_token_id, with_type_ids)
            window["samples"] += len(batch_ids)
            window["tokens"] += sum(len(train_feats[i].input_ids) for i in batch_ids)  # host-side count
            terms = train_step(engine, task_loss, batch, device, l2_sp_z3)
            losses.add(terms)
            if (micro + 1) % tcfg["grad_accum"]:
                continue  # DeepSpeed accumulates; an optimizer step happens every grad_accum micro-batches
            step += 1
            if "first_step" not in stamps:
                first_step_done()
            if fault is not None:
                fault.at_step(step)
            now = time.perf_counter()
            window["times"].append(now - step_started)
            if rank == 0 and (step % max(1, total_steps // 100) == 0 or step == total_steps):
                # the one host sync outside evaluation: at most ~100 per run, for the progress bar
                emit({"kind": "step", "step": step, "epoch": epoch, "loss": float(terms["loss"]),
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
        done = step >= total_steps
        if last_eval_step != step and (eval_every == "epoch" or epoch == last_epoch or done):
            last_eval_step = step
            # a max_steps stop mid-epoch resumes (if the worker dies now) where it stopped: at the end
            nxt = (epoch, micro_total) if done else (epoch + 1, 0)
            if checkpoint_and_report(evaluate(), epoch, step, nxt):
                stopped = f"early stopping: {metric} did not improve for {es['patience']} evaluations"
                break
        if done:
            break
    if "first_step" not in stamps and initial is not None:  # no step was taken (nothing left to train)
        emit(initial, wait=True)
    if stopped is None and tcfg.get("max_steps"):
        stopped = f"reached train.max_steps ({total_steps} optimizer steps)"
    emit({"kind": "end", "step": step, "stop_reason": stopped or "completed all epochs"}, wait=True)


class FaultHook:
    """Test-only fault injection, read from ZEROSHIP_FAULT:

    - "RANK:STEP:MARKER-FILE": that rank exits hard at that optimizer step, once (the marker file
      records that it happened, so the restarted worker runs on);
    - "hang:RANK:STEP": that rank stops answering at that step (a stuck GPU or NCCL), so the others
      wait in their next collective until `scaling.timeout_s` fails the run.
    """

    def __init__(self, step: int, marker: str | None):
        self.step, self.marker = step, marker

    @classmethod
    def from_env(cls, rank: int) -> FaultHook | None:
        spec = os.environ.get("ZEROSHIP_FAULT")
        if not spec:
            return None
        if spec.startswith("hang:"):
            _, r, s = spec.split(":")
            return cls(int(s), None) if int(r) == rank else None
        r, s, marker = spec.split(":", 2)
        if int(r) != rank or os.path.exists(marker):
            return None
        return cls(int(s), marker)

    def at_step(self, step: int) -> None:
        if step != self.step:
            return
        if self.marker is None:
            time.sleep(10**6)  # hung: Ray tears the worker group down once the others time out
        # Ray Train's controller collects reports every 2 s: a crash sooner than that after a
        # checkpoint can lose it (seen in CI: resumed from step 5, not 10). Wait it out, so the
        # test's resume point is deterministic.
        time.sleep(3)
        with open(self.marker, "w") as fh:  # the restarted worker sees it and runs on
            fh.write(str(time.time()))  # when it died, to measure the time to resume
        os._exit(17)  # die hard, as a crashed or preempted worker would
