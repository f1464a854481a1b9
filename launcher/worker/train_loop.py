"""One Ray Train worker's part of a run, as named phases: `setup()` (data, model, DeepSpeed engine, resume),
`train()` (epochs of steps; evaluate and checkpoint on the recipe's schedule), `evaluate()`,
`save_checkpoint()`. Only workers import this module (it imports torch, transformers and DeepSpeed);
`launcher.worker.entry.train_worker` is the entry Ray Train calls.

Device and precision: the worker computes on `launcher.nn.device.worker_device()`; every batch reaches
it through `train_step` / `evaluate.predict` (`to_device`), and θ₀ for L2-SP is kept there. DeepSpeed
owns precision (its `bf16`/`fp16` sections, loss scaling for fp16); losses and metrics are fp32. The
loss terms stay on the device between logging points (`MetricsWindow`), so a step never waits on the GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

import deepspeed  # launcher.worker.entry imported it first, without mlflow (engine.import_deepspeed)
import ray.train
import torch
import torch.distributed as dist
from deepspeed.utils import logger as ds_logger
from transformers import AutoTokenizer

from launcher.data.features import collate, length_grouped_batches
from launcher.data.stream import Shards, batches_in_epoch, lockstep, stand_in, whole_steps
from launcher.eval.evaluate import gold_and_pred, metrics_of, predict
from launcher.nn.device import worker_device
from launcher.nn.model import apply_freeze, apply_lora, build_model, param_groups, trainable_params, warm_start
from launcher.recipe import zero_auto
from launcher.recipe.ds_config import build_ds_config
from launcher.recipe.schema import Recipe, tokenizer_source
from launcher.worker.checkpoint import CKPT_TAG, STATE_FILE, save_stage0_fp32
from launcher.worker.engine import (
    Schedule,
    adamw,
    bound_collective_timeouts,
    seed_everything,
    skip_shm_comm_build,
    skip_single_rank_allreduce,
    train_step,
)
from launcher.worker.loop_state import Board, EarlyStopping, MetricsWindow, ResumeState, step_hook
from launcher.worker.regularize import PartitionedL2SP, TaskLoss
from launcher.worker.signing import sign_checkpoint, verify_checkpoint, worker_key


class TrainingRun:
    """Everything in `config` (the Recipe, the label set, the plan's data figures, a handle to the
    driver's progress board); nothing is read from module globals. `stamps` times the start-up phases
    (launcher.driver.startup); they are reported after the first optimizer step."""

    def __init__(self, config: dict[str, Any], stamps: dict[str, float]):
        self.config, self.stamps = config, stamps
        self.recipe: Recipe = config["recipe"]
        self.labels = config["labels"]
        self.task, self.metric = self.recipe.model.task, config["metric"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = worker_device()
        self.board = Board(config.get("progress"), self.rank, config.get("trial", ""))
        stopping = self.recipe.train.early_stopping
        self.early = EarlyStopping(config["mode"], stopping.model_dump() if stopping else None)
        self.window = MetricsWindow()
        self.resume = ResumeState()
        self.resumed = False  # True when this worker group restarted from a checkpoint
        self.step = 0  # optimizer steps taken
        self.last_eval_step = -1

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        bound_collective_timeouts(self.recipe.scaling.timeout_s)
        skip_shm_comm_build()
        torch.set_num_threads(max(1, int(self.recipe.scaling.cpus_per_worker)))
        ds_logger.setLevel("WARNING")
        seed_everything(self.recipe.train.seed)
        self.signing_key = worker_key()
        self.setup_data()
        self.stamps["data"] = time.time()
        model = self.build_model()
        self.stamps["model"] = time.time()
        self.setup_engine(model)
        self.restore()
        self.hook = step_hook(self.rank)
        self.stamps["engine"] = time.time()

    def setup_data(self) -> None:
        """This rank's shards (launcher.data.stream) and the schedule's step count, from the plan's training
        windows (launcher.data.estimate: exact for a split the driver read whole, else estimated); every rank
        gets the same number of windows (`streaming_split(equal=True)`), so the same number of batches. The
        first whole epoch counts its micro-batches (`count_epoch`)."""
        tc, figures = self.recipe.train, self.config["figures"]
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(self.recipe.model))
        self.data = Shards(self.task, self.labels, tc.batch_size, tc.seed, keep=figures.cache,
                           tokenized=frozenset(self.config.get("tokenized", ())))
        if ray.train.get_checkpoint() is None:  # a fresh start's first epoch (a resume's is in its checkpoint)
            self.data.prefetch(self.resume.next_epoch)
        self.approximate = not figures.exact and not tc.max_steps  # "≈" on the progress bar until counted
        self.epoch_micro: int | None = None  # micro-batches per epoch, once an epoch has counted them
        self.total_steps = self.steps_for(batches_in_epoch(figures.train_windows // self.world, tc.batch_size))

    def steps_for(self, micro_per_epoch: int) -> int:
        """The run's optimizer steps for epochs of `micro_per_epoch` micro-batches (whole optimizer steps only;
        train.max_steps overrides epochs)."""
        tc = self.recipe.train
        return tc.max_steps or max(1, micro_per_epoch // tc.grad_accum) * tc.epochs

    def build_model(self):
        m, reg = self.recipe.model, self.recipe.regularization
        if m.init_from:  # warm start from an earlier run's winner (the plan settled its folder)
            model = warm_start(m.init_from, self.labels, m.head.model_dump(mode="json"), m.init_from_head, m.casing)
        else:
            model = build_model(m.model_dump(mode="json"), self.labels,
                                dropout={"hidden": reg.hidden_dropout, "attention": reg.attention_dropout})
        apply_freeze(model, m.freeze)
        if m.lora:
            apply_lora(model, m.lora.model_dump(mode="json"))
        return model

    def setup_engine(self, model) -> None:
        """ZeRO stage (`auto` resolved here, the same on every rank), loss, optimizer, schedule, engine."""
        self.zero_choice = None
        if self.recipe.deepspeed.zero_stage == "auto":
            self.recipe, self.zero_choice = zero_auto.resolve(self.recipe, model, *zero_auto.worker_memory(self.device))
        self.stage, self.precision = self.recipe.deepspeed.zero_stage, self.recipe.deepspeed.precision
        zero3, tc, rc = self.stage == 3, self.recipe.train, self.recipe.regularization
        # takes θ₀ for L2-SP before DeepSpeed touches (casts, moves, partitions) the weights
        self.task_loss = TaskLoss(model, rc.model_dump(mode="json"), partitioned=zero3, device=self.device)
        self.with_type_ids = model.uses_token_type_ids
        optimizer = adamw(param_groups(model, rc.weight_decay, tc.lr, tc.head_lr, tc.layer_decay), tc.lr)
        warmup = int(tc.warmup_ratio * self.total_steps)
        self.schedule = Schedule(tc.schedule, warmup, self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=build_ds_config(self.recipe.as_dict(), self.world, trainable_params(model)))
        skip_single_rank_allreduce(self.engine, self.world, self.stage)
        self.l2_sp_z3 = PartitionedL2SP(self.engine.module, rc.l2_sp, self.device) if zero3 and rc.l2_sp else None

    def restore(self) -> None:
        """After a worker failure Ray Train restarts the group with the last reported checkpoint:
        model, optimizer, schedule, each rank's RNG and the position in the epoch come back."""
        restored = ray.train.get_checkpoint()
        if restored is None:
            return
        with restored.as_directory() as folder:
            verify_checkpoint(folder, self.signing_key)  # before DeepSpeed unpickles anything in it
            _, client = self.engine.load_checkpoint(folder, tag=CKPT_TAG)  # model, optimizer, scheduler
            rng = torch.load(os.path.join(folder, f"rng_rank{self.rank}.pt"), weights_only=True)
        torch.set_rng_state(rng["torch"])
        self.resume = ResumeState.from_dict(client["zeroship_resume"])
        self.early.best, self.early.bad = self.resume.best_value, self.resume.bad_evals
        self.resumed, self.step = True, self.resume.step
        if self.resume.epoch_micro is not None:  # counted before the checkpoint (the schedule's stretch came
            self.epoch_micro = self.resume.epoch_micro  # back with the scheduler's state)
            self.total_steps, self.approximate = self.steps_for(self.epoch_micro), False
        self.last_eval_step = self.step

    # ---------------------------------------------------------------- train
    def train(self) -> None:
        self.board.push({"kind": "start", "total_steps": self.total_steps, "estimated": self.approximate,
                         "world": self.world,
                         "resumed_from_step": self.step if self.resumed else None,
                         "zero_auto": self.zero_choice})
        self.initial = None
        if self.recipe.model.init_from and not self.resumed:  # where the parent leaves off, before any step
            self.initial = {"kind": "initial", **self.evaluate(), "epoch": 0, "step": 0}  # after the startup record
        self.started = time.time()
        stopped, epoch = None, self.resume.next_epoch
        while not self.is_past_last(epoch):
            stopped = self.train_epoch(epoch)
            if stopped or self.step >= self.total_steps:
                break
            epoch += 1
        if "first_step" not in self.stamps and self.initial is not None:  # no step was taken (nothing left)
            self.board.push(self.initial, wait=True)
        if stopped is None and self.recipe.train.max_steps:
            stopped = f"reached train.max_steps ({self.total_steps} optimizer steps)"
        if self.rank == 0:
            self.board.push({"kind": "data", "splits": self.data.data_record()})
        self.board.push({"kind": "end", "step": self.step, "stop_reason": stopped or "completed all epochs"}, wait=True)

    def is_past_last(self, epoch: int) -> bool:
        """Past the run's last epoch: the recipe's epochs, or with train.max_steps as many as its steps need."""
        tc = self.recipe.train
        if tc.max_steps:
            per_epoch = max(1, (self.epoch_micro or 0) // tc.grad_accum)
            return self.epoch_micro is not None and epoch > -(-self.total_steps // per_epoch)
        return epoch > tc.epochs

    def count_epoch(self, micro: int) -> None:
        """The first whole epoch's micro-batches: the exact step count from now on. When it differs from the
        plan's, the learning-rate schedule is stretched over the steps that remain (engine.Schedule); the
        progress display shows the count without its ≈ from here."""
        if self.epoch_micro is not None:
            return
        self.epoch_micro, total = micro, self.steps_for(micro)
        if self.approximate or total != self.total_steps:
            self.board.push({"kind": "total", "step": self.step, "total_steps": total, "micro_batches": micro})
        if total != self.total_steps:
            self.schedule.stretch(self.step, total)
            self.total_steps = total
        self.approximate = False

    def train_epoch(self, epoch: int) -> str | None:
        """One epoch (or what is left of it after a resume); returns why training stops, if it does."""
        accum, eval_every = self.recipe.train.grad_accum, self.recipe.train.eval_every
        self.engine.train()
        step_started = time.perf_counter()
        micro = -1
        for micro, feats in enumerate(whole_steps(self.data.epoch(epoch), accum)):
            if self.resume.consumed(epoch, micro):
                continue  # read to the end: every rank's stream finishes the epoch together
            if self.step >= self.total_steps and not self.approximate:
                break
            terms = self.train_micro_batch(feats)
            if (micro + 1) % accum:
                continue  # DeepSpeed accumulates; an optimizer step happens every grad_accum micro-batches
            self.after_step(epoch, terms, time.perf_counter() - step_started)
            if isinstance(eval_every, int) and self.step % eval_every == 0:
                nxt = (epoch, micro + 1) if self.epoch_micro is None or micro + 1 < self.epoch_micro else (epoch + 1, 0)
                if self.evaluate_and_save(epoch, nxt):
                    return self.early.reason(self.metric)
            step_started = time.perf_counter()  # step time excludes evaluation and checkpointing
        else:
            self.count_epoch(micro + 1)  # the stream ran to its end: a whole epoch
        done = self.step >= self.total_steps
        if self.last_eval_step != self.step and (eval_every == "epoch" or self.is_past_last(epoch + 1) or done):
            # a max_steps stop mid-epoch resumes (if the worker dies now) where it stopped: at the end
            nxt = (epoch, micro + 1) if done else (epoch + 1, 0)
            if self.evaluate_and_save(epoch, nxt):
                return self.early.reason(self.metric)
        return None

    def train_micro_batch(self, feats: list) -> dict[str, Any]:
        batch = collate(feats, self.tokenizer.pad_token_id, self.with_type_ids)
        terms = train_step(self.engine, self.task_loss, batch, self.device, self.l2_sp_z3)
        self.window.add_batch(len(feats), sum(len(f.input_ids) for f in feats), terms)  # host-side counts
        return terms

    def after_step(self, epoch: int, terms: dict[str, Any], seconds: float) -> None:
        """Bookkeeping after an optimizer step: the start-up record, the hook, the progress bar."""
        self.step += 1
        if "first_step" not in self.stamps:  # the start-up record comes first in metrics.jsonl
            self.stamps["first_step"] = time.time()
            self.board.push({"kind": "startup", "stamps": self.stamps,
                             "resumed_from_step": self.resume.step if self.resumed else None})
            if self.initial is not None:
                self.board.push(self.initial, wait=True)
        self.hook.after_step(self.step)
        self.window.add_step_time(seconds)
        if self.rank == 0 and (self.step % max(1, self.total_steps // 100) == 0 or self.step == self.total_steps):
            # the one host sync outside evaluation: at most ~100 per run, for the progress bar
            self.board.push({"kind": "step", "step": self.step, "epoch": epoch, "loss": float(terms["loss"]),
                             "lr": self.scheduler.get_last_lr()[0], "elapsed": time.time() - self.started})

    # ---------------------------------------------------------------- evaluate + checkpoint
    def evaluate(self) -> dict[str, float]:
        """Every rank predicts its validation shard (whole sentences); the scored pairs are gathered."""
        self.engine.eval()
        examples, feats = self.data.validation_examples()
        batches = length_grouped_batches([len(f.input_ids) for f in feats], self.recipe.train.batch_size, 0,
                                         shuffle=False)
        batches, real = lockstep(batches, self.device)
        run_on = feats or [stand_in(self.task, self.tokenizer)]  # a rank whose shard is empty still runs
        preds, loss_sum, count = predict(self.engine, run_on, batches, real, self.tokenizer.pad_token_id,
                                         self.with_type_ids, self.device)
        gold, pred = gold_and_pred(self.task, self.labels, examples, feats, preds)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (gold, pred, loss_sum, count))
        self.engine.train()
        return metrics_of(self.task, self.labels, [g for part in gathered for g in part[0]],
                          [p for part in gathered for p in part[1]], sum(part[2] for part in gathered),
                          sum(part[3] for part in gathered))

    def evaluate_and_save(self, epoch: int, next_pos: tuple[int, int]) -> bool:
        """Evaluate, save and report; True when early stopping says stop (rank 0 decides, every rank
        stops at the same step). `next_pos`: (epoch, micro-batch) where a resume from here continues."""
        self.last_eval_step = self.step
        metrics = {**self.evaluate(), **self.window.read(self.world), "lr": self.scheduler.get_last_lr()[0]}
        if torch.cuda.is_available():  # the GPU benchmark reads it (benchmarks/gpu.sh)
            metrics["train_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        stop = [self.early.update(metrics[self.metric])]
        dist.broadcast_object_list(stop, src=0)
        state = ResumeState(self.step, next_pos[0], next_pos[1], self.early.best, self.early.bad, epoch,
                            self.epoch_micro)
        self.save_checkpoint(metrics, state)
        return stop[0]

    def save_checkpoint(self, metrics: dict[str, float], state: ResumeState) -> None:
        """Every rank saves its ZeRO shard (rank 0 also the fp32 weights at stage 0 and the run state),
        signs what it wrote, and reports the checkpoint with the metrics to Ray Train."""
        record = {**metrics, "epoch": state.epoch, "step": state.step, "trial": self.config.get("trial", "")}
        tmp = tempfile.mkdtemp(prefix="zeroship-ckpt-")
        try:
            self.engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"zeroship_resume": state.to_dict()})
            # each rank's RNG, so dropout after a resume repeats the uninterrupted run exactly
            torch.save({"torch": torch.get_rng_state()}, os.path.join(tmp, f"rng_rank{self.rank}.pt"))
            if self.rank == 0:
                if self.stage == 0:  # fp32 masters for best/ (see launcher.worker.checkpoint)
                    save_stage0_fp32(self.engine, tmp)
                with open(os.path.join(tmp, STATE_FILE), "w") as fh:
                    json.dump({"epoch": state.epoch, "step": state.step, "metrics": metrics, "labels": self.labels,
                               "zero_stage": self.stage, "precision": self.precision}, fh)
            sign_checkpoint(tmp, self.signing_key, self.rank)  # last: it covers every file this rank wrote
            self.board.push({"kind": "eval", **record}, wait=True)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
