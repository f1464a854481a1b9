"""The small pieces of state a worker's training loop keeps, each with one job and its own tests:
where to resume (`ResumeState`), when to stop (`EarlyStopping`), what to log since the last
evaluation (`MetricsWindow`, `LossWindow`), the progress board (`Board`) and the test-only fault
hook (`step_hook`). torch is imported only where a tensor is read (`LossWindow.read`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ResumeState:
    """Where training continues if it resumes from a checkpoint: after `step` optimizer steps, at
    micro-batch `next_micro` of epoch `next_epoch` (epochs count from 1), with early stopping's memory.
    Kept in DeepSpeed's client state under `zeroship_resume` (its keys are what checkpoints hold)."""

    step: int = 0
    next_epoch: int = 1
    next_micro: int = 0
    best_value: float | None = None
    bad_evals: int = 0
    epoch: int = 0  # the epoch the checkpoint was taken in (for the record only)
    epoch_micro: int | None = None  # micro-batches in an epoch, once a whole epoch has counted them

    @classmethod
    def from_dict(cls, state: dict) -> ResumeState:
        return cls(**{k: state[k] for k in ("step", "next_epoch", "next_micro", "best_value", "bad_evals")},
                   epoch=state.get("epoch", 0), epoch_micro=state.get("epoch_micro"))

    def to_dict(self) -> dict:
        return asdict(self)

    def consumed(self, epoch: int, micro: int) -> bool:
        """Was this micro-batch trained on before the checkpoint? (Batches are a pure function of
        the seed and the epoch, so skipping them restores the position inside the epoch exactly.)"""
        return epoch == self.next_epoch and micro < self.next_micro


class EarlyStopping:
    """Tracks the best value of the recipe's metric; says stop after `patience` evaluations without an
    improvement larger than `min_delta`. Without `train.early_stopping` it only tracks the best."""

    def __init__(self, mode: str, config: dict | None, best: float | None = None, bad: int = 0):
        self.mode, self.config = mode, config
        self.best, self.bad = best, bad

    def update(self, value: float) -> bool:
        """Record one evaluation; True when training should stop."""
        from launcher.eval.ranking import better

        if better(self.mode, value, self.best, self.config["min_delta"] if self.config else 0):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return bool(self.config and self.bad >= self.config["patience"])

    def reason(self, metric: str) -> str:
        return f"early stopping: {metric} did not improve for {self.config['patience']} evaluations"


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


class MetricsWindow:
    """What the training records between two evaluations: loss terms, step times, samples and tokens
    (counted on the host, from the batch's lengths). `read` gives the train_* metrics and starts afresh."""

    def __init__(self) -> None:
        self.losses = LossWindow()
        self.times: list[float] = []
        self.samples = self.tokens = 0

    def add_batch(self, samples: int, tokens: int, terms: dict[str, Any]) -> None:
        self.samples += samples
        self.tokens += tokens
        self.losses.add(terms)

    def add_step_time(self, seconds: float) -> None:
        self.times.append(seconds)

    def read(self, world: int) -> dict[str, float]:
        """Mean loss (and each term as train_loss_<name>), median step time, and throughput of all
        ranks (every rank runs the same number of steps on batches of the same size)."""
        times = sorted(self.times)
        total = sum(times) or 1e-9
        terms = self.losses.read()
        stats = {"train_loss": terms.pop("loss", 0.0),
                 "train_step_s": times[len(times) // 2] if times else 0.0,
                 "train_samples_per_s": self.samples * world / total,
                 "train_tokens_per_s": self.tokens * world / total}
        stats.update({f"train_loss_{name}": value for name, value in terms.items()})
        self.times, self.samples, self.tokens = [], 0, 0
        return stats


class Board:
    """Rank 0's line to the driver's progress board (launcher.driver.console); other ranks stay silent."""

    def __init__(self, actor, rank: int, trial: str):
        self.actor, self.rank, self.trial = actor, rank, trial

    def push(self, event: dict, wait: bool = False) -> None:
        """`wait` for records that must reach the board before what follows (evaluations, the end)."""
        if self.actor is None or self.rank != 0:
            return
        ref = self.actor.push.remote({"trial": self.trial, **event})
        if wait:
            import ray

            ray.get(ref)


class StepHook:
    """Called once after every optimizer step; does nothing outside the fault tests."""

    def after_step(self, step: int) -> None:
        pass


class FaultHook(StepHook):
    """Test-only fault injection, read from ZEROSHIP_FAULT. It ships in the loop on purpose: the fault tests
    (tests/e2e/test_e2e_faults.py) kill or hang a real Ray Train worker process mid-run, which only code
    running inside that worker can do; without the variable `step_hook` returns the no-op StepHook.

    - "RANK:STEP:MARKER-FILE": that rank exits hard at that optimizer step, once (the marker file
      records that it happened, so the restarted worker runs on);
    - "hang:RANK:STEP": that rank stops answering at that step (a stuck GPU or NCCL), so the others
      wait in their next collective until `scaling.timeout_s` fails the run.
    """

    def __init__(self, step: int, marker: str | None):
        self.step, self.marker = step, marker

    def after_step(self, step: int) -> None:
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


def step_hook(rank: int) -> StepHook:
    """This rank's hook: a FaultHook when ZEROSHIP_FAULT names it (and its marker is not there yet)."""
    spec = os.environ.get("ZEROSHIP_FAULT")
    if not spec:
        return StepHook()
    if spec.startswith("hang:"):
        _, r, s = spec.split(":")
        return FaultHook(int(s), None) if int(r) == rank else StepHook()
    r, s, marker = spec.split(":", 2)
    if int(r) != rank or os.path.exists(marker):
        return StepHook()
    return FaultHook(int(s), marker)
