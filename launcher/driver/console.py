"""What a launch shows while it runs and at the end: the live progress rows (fed by a progress-board
actor the workers push to), the trial, cross-validation and result tables."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from launcher.driver import startup
from launcher.eval.ranking import better
from launcher.runs.registry import Run

console = Console()


def progress_board():
    """A tiny actor that workers push events to and the driver drains (works across nodes)."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self) -> None:
            self.events: list[dict] = []

        def push(self, event: dict) -> None:
            self.events.append(event)

        def drain(self) -> list[dict]:
            events, self.events = self.events, []
            return events

    return ProgressBoard.remote()


# ------------------------------------------------------------------ progress display
class ProgressView:
    """Drains the board in a thread, appends evaluations to metrics.jsonl, and draws one live row per
    trial (a single run is one row): parameters, step, loss, best metric so far."""

    def __init__(self, board, run: Run, metric: str, mode: str):
        self.board, self.run, self.metric, self.mode = board, run, metric, mode
        self.evals: list[dict] = []
        self.stop_reasons: dict[str, str] = {}
        self.params: dict[str, dict] = {}
        self.best: dict[str, float] = {}
        self.totals: dict[str, str] = {}  # per trial, as shown: "120", or "≈ 120" until the workers know it
        self.data: dict[str, dict] = {}  # per trial: what Ray Data tokenized (the workers' tally)
        self.tasks: dict[str, Any] = {}
        self._stop = threading.Event()
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=20),
                                 TextColumn("{task.fields[steps]}"), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, transient=False)

    @property
    def stop_reason(self) -> str | None:
        return self.stop_reasons.get("") or "; ".join(f"{t}: {r}" for t, r in self.stop_reasons.items()) or None

    def expect_trials(self, trials: list[dict]) -> None:
        for t in trials:
            fold = {"fold": t["fold"]} if t.get("fold") is not None else {}
            self.params[t["name"]] = {**t["params"], **fold}
            self._task(t["name"], "pending")

    def _task(self, trial: str, info: str = ""):
        if trial not in self.tasks:
            params = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.params.get(trial, {}).items())
            desc = f"{trial} {params}" if trial else self.run.id
            self.tasks[trial] = self.progress.add_task(desc, total=None, info=info, steps="")
        return self.tasks[trial]

    def _info(self, trial: str, extra: str = "") -> str:
        best = f"best {self.metric}={self.best[trial]:.4f}" if trial in self.best else ""
        return " ".join(x for x in (extra, best) if x)

    def handle(self, event: dict) -> None:
        kind, trial = event.pop("kind"), event.get("trial", "")
        task = self._task(trial)
        if kind == "start":
            if event.get("resumed_from_step") is not None:
                self.run.append_metrics({"kind": "resume", "trial": trial, "step": event["resumed_from_step"],
                                         "time": time.time()})
                self.progress.console.print(f"{trial or self.run.id}: workers restarted, resuming from the"
                                            f" checkpoint at step {event['resumed_from_step']}")
            if event.get("zero_auto") and event.get("resumed_from_step") is None:
                self.progress.console.print(f"{trial or self.run.id}: {escape(event['zero_auto'])}", highlight=False)
            self.totals[trial] = f"{'≈' if event.get('estimated') else ''}{event['total_steps']}"
            self.progress.update(task, total=event["total_steps"], info=self._info(trial, "running"),
                                 steps=f"step 0/{self.totals[trial]}")
        elif kind == "total":  # the exact step count, known at the end of the first epoch
            self.totals[trial] = str(event["total_steps"])
            self.progress.update(task, total=event["total_steps"],
                                 steps=f"step {event['step']}/{self.totals[trial]}")
            self.run.append_metrics({"kind": "total", "trial": trial, "step": event["step"],
                                     "total_steps": event["total_steps"],
                                     "micro_batches_per_epoch": event["micro_batches"]})
        elif kind == "data":
            self.data[trial] = event["splits"]
        elif kind == "step":
            if self.run.logger is not None:
                self.run.logger.log(trial, event["step"], {"train_loss": event["loss"], "lr": event.get("lr")})
            self.progress.update(
                task,
                completed=event["step"],
                steps=f"step {event['step']}/{self.totals.get(trial, '?')}",
                info=self._info(trial, f"loss {event['loss']:.4f}"),
            )
        elif kind == "eval":
            self.evals.append(event)
            self.run.append_metrics({"kind": "eval", **event})
            if self.run.logger is not None:
                self.run.logger.log(trial, event["step"], event)
            value = event[self.metric]
            if better(self.mode, value, self.best.get(trial)):
                self.best[trial] = value
            shown = " ".join(f"{k}={v:.4f}" for k, v in event.items() if k.startswith("eval_"))
            self.progress.console.print(f"{trial + ' ' if trial else ''}epoch {event['epoch']} step {event['step']}:"
                                        f" {shown}  ({event.get('train_samples_per_s', 0):.1f} samples/s)",
                                        highlight=False)
            self.progress.update(task, completed=event["step"], info=self._info(trial))
        elif kind == "initial":  # a warm start's evaluation before training (not a checkpoint)
            self.run.append_metrics({"kind": "initial", **event})
            shown = " ".join(f"{k}={v:.4f}" for k, v in event.items() if k.startswith("eval_"))
            self.progress.console.print(f"{trial + ' ' if trial else ''}before training: {shown}", highlight=False)
        elif kind == "startup":
            rec = startup.record(self.run.stamps, event)
            self.run.append_metrics(rec)
            self.progress.console.print(f"{trial or self.run.id}: {startup.summary(rec)}", highlight=False)
        elif kind == "end":
            self.stop_reasons[trial] = event.get("stop_reason")
            self.progress.update(task, info=self._info(trial, "done"))

    def drain(self) -> None:
        import ray

        for event in ray.get(self.board.drain.remote()):
            self.handle(event)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.drain()
            except Exception:  # the display must never take the run down
                pass

    def __enter__(self) -> ProgressView:
        self.progress.start()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        try:
            self.drain()
        finally:
            self.progress.stop()


def print_cv(cv: list[dict], metric: str, k: int) -> None:
    table = Table(title=f"{k}-fold cross-validation ({metric}, best evaluation of each fold)")
    for col in ("point", "params", "folds", "mean ± std"):
        table.add_column(col)
    for e in cv:
        table.add_row(str(e["point"]), escape(json.dumps(e["params"])), " ".join(f"{v:.4f}" for v in e["folds"]),
                      f"{e['mean']:.4f} ± {e['std']:.4f}")
    console.print(table)


def print_trials(trials: list[dict], metric: str, winner: str) -> None:
    table = Table(title="sweep trials")
    for col in ("trial", "params", f"best {metric}", "state"):
        table.add_column(col)
    for t in trials:
        state = {"failed": "[red]failed[/]", "pruned": "[yellow]pruned[/]"}.get(t["state"], t["state"])
        best = f"{t['best']:.4f}" if t["best"] is not None else "-"
        name = f"[bold]{t['name']}[/] ★" if t["name"] == winner else t["name"]
        table.add_row(name, escape(json.dumps(t["params"])), best, state)
    console.print(table)


def print_results(run: Run, winner, metrics: dict, stop_reason: str | None, wall: float) -> None:
    """The winner (launcher.driver.winner.Winner) and its metrics after the merge."""
    trial = f"{winner.trial}, " if winner.trial else ""
    table = Table(title=f"{run.id} results (winner: {trial}epoch {winner.epoch}, step {winner.step})")
    table.add_column("split")
    keys = [k for k in metrics.get("validation", {}) if k.startswith("eval_")]
    for k in keys:
        table.add_column(k.removeprefix("eval_"))
    for split in ("validation", "test"):
        if split in metrics:
            table.add_row(split, *[f"{metrics[split][k]:.4f}" for k in keys])
    console.print(table)
    from launcher.eval.report import print_report

    reports = json.loads((run.best_dir / "report.json").read_text())
    for split, report in reports.items():
        print_report(report, f"{run.id} {split}: per-label report", console)
    if stop_reason:
        console.print(f"stopped: {stop_reason}; wall time {wall:.0f} s")
    console.print(f"[bold green]{run.id} succeeded[/]: {winner.metric}={winner.value:.4f} → {run.best_dir}",
                  highlight=False)
    storage = run.remote.uri if run.remote else str(run.dir.parent)
    console.print(f"export it: zeroship export onnx {run.id}" + (
        f" --runs {storage}" if run.remote or run.dir.parent.resolve() != Path("runs").resolve() else ""))
