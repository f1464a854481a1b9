"""The pieces of a worker's training step around the DeepSpeed engine: seeding, the learning-rate
schedule, importing DeepSpeed and its CPU / one-rank shortcuts, bounded collectives, `train_step`.
The run that uses them, phase by phase, is `launcher.worker.train_loop.TrainingRun`. Nothing heavy is
imported at module level (benchmarks and the test conftest import it before torch is needed).
"""

from __future__ import annotations

import math
import random
from typing import Any


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Schedule:
    """The learning-rate factor per optimizer step (torch's LambdaLR calls it): linear warmup over `warmup`
    steps, then constant, cosine or linear decay to 0 at step `total`.

    A run that starts from the plan's estimate of its windows (launcher.data.estimate) learns the exact
    count at the end of its first epoch; `stretch(step, total)` then maps the steps left, [step, total], onto
    what was left of the planned schedule, [step, planned total], linearly: the factor is continuous at
    `step` and reaches the planned end (0 for linear and cosine) exactly at the new last step. Its state is
    plain numbers in `__dict__`, which LambdaLR's `state_dict` saves with DeepSpeed's checkpoint, so a resumed
    run continues with the stretched schedule."""

    def __init__(self, kind: str, warmup: int, total: int):
        self.kind, self.warmup, self.total = kind, warmup, total
        # the stretch: from step `at` (at `planned_at` on the planned axis), `new_total` steps in all
        self.at: int | None = None
        self.new_total: int | None = None
        self.planned_at: float | None = None

    def stretch(self, step: int, total: int) -> None:
        planned = min(self._planned(step), self.total)  # a second stretch composes with the first
        self.at, self.new_total, self.planned_at = step, max(total, step), planned

    def _planned(self, step: int) -> float:
        """Where `step` of the stretched run falls on the planned schedule's axis."""
        if self.at is None or step <= self.at:
            return step
        span = max(1, self.new_total - self.at)
        return self.planned_at + (step - self.at) * (self.total - self.planned_at) / span

    def __call__(self, step: int) -> float:
        x = self._planned(step)
        if x < self.warmup:
            return (x + 1) / max(1, self.warmup)
        if self.kind == "constant":
            return 1.0
        progress = (x - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)


def adamw(groups: list[dict], lr: float):
    """torch's AdamW with its fused kernel: one vectorized pass per parameter group. Without `fused`,
    torch steps CPU parameters one tensor at a time (its `foreach` path is for CUDA only); under ZeRO
    each group is one flat fp32 partition, and the per-tensor path spent ~100 ms of a 410 ms ZeRO-2 step
    on the quickstart model where the fused kernel spends ~15 (benchmarks/train_overhead.py, RESULTS.md).
    transformers' `Trainer` uses the same kernel by default. Built while the model is still on the CPU;
    CPU and CUDA (where DeepSpeed then moves the groups, or keeps them with optimizer offload) both have
    the kernel."""
    import torch

    return torch.optim.AdamW(groups, lr=lr, fused=True)


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
    (the driver does, launcher.runs.observe), and the block lasts only for this import."""
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
    environment's build replaced it in the shared `~/.cache/torch_extensions` (measured on 2-core CPU workers).
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
    from launcher.nn.device import to_device

    batch = to_device(batch, device)
    labels = batch.pop("labels")
    loss, parts = task_loss(engine.module, engine, batch, labels)
    engine.backward(loss)
    if l2_sp_z3 is not None and engine.is_gradient_accumulation_boundary():
        parts["l2_sp"] = l2_sp_z3.apply()  # ZeRO-3: on each rank's gradient partition
    engine.step()
    return {"loss": loss.detach().float(), **parts}
