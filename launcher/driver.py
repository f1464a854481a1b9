"""The driver: allocate the run, connect to Ray, fit a TorchTrainer, keep the winner.

Flow: allocate `run-N` → write recipe.yaml → ray (cluster if one is there, else a local one on
127.0.0.1) → TorchTrainer(train_worker) with a live progress display → pick the best checkpoint
by the recipe's metric → merge its ZeRO shards into `best/` (written to a temp folder, renamed
into place only once complete) → evaluate the merged model again → status `succeeded`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from launcher import startup
from launcher.checkpoint import merged_state_dict, read_state
from launcher.data import examples_to_dicts
from launcher.errors import Problem, ZeroshipError
from launcher.plan import Plan, resource_problems
from launcher.recipe import Recipe
from launcher.runs import Registry, Run, atomic_write, atomic_write_json
from launcher.signing import KEY_ENV, load_key
from launcher.storage import is_uri
from launcher.train_loop import train_worker

console = Console()


class ClusterError(ZeroshipError):
    """The Ray cluster cannot run this recipe."""


# ------------------------------------------------------------------ Ray
def connect_ray(recipe: Recipe, storage: str | None = None, log_to_driver: bool = True) -> str:
    """Join the cluster when one is there, else start a local Ray bound to loopback
    (launcher.ray_session), then check it can run the recipe. Returns a short description."""
    from launcher.ray_session import init_ray

    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if os.environ.get("ZEROSHIP_FAULT"):  # test-only fault hook (train_loop.FaultHook)
        env["ZEROSHIP_FAULT"] = os.environ["ZEROSHIP_FAULT"]
    env[KEY_ENV] = load_key().hex()  # workers sign their checkpoints with it (launcher.signing)
    where = init_ray(env, log_to_driver)
    if where == "existing ray session":
        return where
    _check_resources(recipe)
    if storage and not is_uri(storage):  # a URI is reachable from every node by construction
        check_shared_storage(Path(storage))
    return where


def check_shared_storage(root: Path, nodes: list[dict] | None = None, probe=None) -> int:
    """On a cluster of more than one node every node must see run.storage: workers write their
    checkpoint shards there and the driver merges them. A marker file written here is looked for by
    a task pinned to each node; returns the number of nodes checked. `nodes` (ray.nodes() rows) and
    `probe(node_ids, path, token) -> [seen]` are for tests (default: the cluster, a task per node)."""
    import uuid

    import ray

    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    if len(nodes) <= 1:
        return len(nodes)
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = (root / f".zeroship-shared-check-{token}").resolve()
    marker.write_text(token)
    try:
        results = (probe or _probe_on_node)([n["NodeID"] for n in nodes], str(marker), token)
    finally:
        marker.unlink(missing_ok=True)
    blind = [n.get("NodeManagerAddress", n["NodeID"][:8]) for n, seen in zip(nodes, results) if not seen]
    if blind:
        raise ClusterError(Problem(
            "run.storage", f"{root} is not shared: {len(blind)} of the cluster's {len(nodes)} nodes cannot see it "
            f"({', '.join(blind[:4])}); workers on those nodes would write checkpoints the driver never sees",
            "put runs on storage every node mounts (an NFS/EFS path such as /mnt/shared/zeroship/runs, see "
            "cluster/aws-gpu.yaml) and set run.storage (or --runs) to it"))
    return len(nodes)


def _probe_on_node(node_ids: list[str], path: str, token: str) -> list[bool]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def sees(path: str, token: str) -> bool:
        try:
            return Path(path).read_text() == token
        except OSError:
            return False

    refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(path, token)
            for node in node_ids]
    return ray.get(refs, timeout=120)


def _check_resources(recipe: Recipe) -> None:
    import ray

    problems = resource_problems(recipe, ray.cluster_resources(), "the cluster")
    if problems:
        raise ClusterError(problems)


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
        self.totals: dict[str, int] = {}
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
            self.totals[trial] = event["total_steps"]
            self.progress.update(task, total=event["total_steps"], info=self._info(trial, "running"),
                                 steps=f"step 0/{event['total_steps']}")
        elif kind == "step":
            if self.run.logger is not None:
                self.run.logger.log(trial, event["step"], {"train_loss": event["loss"], "lr": event.get("lr")})
            self.progress.update(task, completed=event["step"], steps=f"step {event['step']}/{self.totals.get(trial, '?')}",
                                 info=self._info(trial, f"loss {event['loss']:.4f}"))
        elif kind == "eval":
            self.evals.append(event)
            self.run.append_metrics({"kind": "eval", **event})
            if self.run.logger is not None:
                self.run.logger.log(trial, event["step"], event)
            value = event[self.metric]
            if trial not in self.best or (value > self.best[trial] if self.mode == "max" else value < self.best[trial]):
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


# ------------------------------------------------------------------ fit
def worker_config(recipe: Recipe, resolved: dict, plan: Plan, board, trial: str = "") -> dict:
    """What every worker receives: the resolved recipe, labels, parsed examples, the progress board."""
    data = {name: examples_to_dicts(split.examples) for name, split in plan.dataset.splits.items()
            if name in ("train", "validation")}
    return {"recipe": resolved, "labels": plan.dataset.labels, "data": data, "progress": board,
            "metric": recipe.metric, "mode": recipe.mode, "trial": trial}


def make_trainer(recipe: Recipe, config: dict, storage: str, name: str, callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    sc = recipe.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    return TorchTrainer(
        train_worker,
        train_loop_config=config,
        # Ray Train picks the backend from use_gpu (NCCL on GPUs, gloo on CPUs); the timeout bounds
        # every collective, so a rank that hangs fails the run instead of stalling it forever
        torch_config=TorchConfig(timeout_s=sc.timeout_s),
        scaling_config=ray.train.ScalingConfig(num_workers=sc.workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=sc.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks or [],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=recipe.run.keep_best, checkpoint_score_attribute=recipe.metric,
                checkpoint_score_order=recipe.mode),
            failure_config=ray.train.FailureConfig(max_failures=recipe.run.max_failures)),
    )


def fit(recipe: Recipe, resolved: dict, plan: Plan, run: Run) -> tuple[Any, ProgressView]:
    board = progress_board()
    trainer = make_trainer(recipe, worker_config(recipe, resolved, plan, board), run.ray_storage, "train")
    with ProgressView(board, run, recipe.metric, recipe.mode) as view:
        result = trainer.fit()
    return result, view


def fit_sweep(recipe: Recipe, resolved: dict, plan: Plan, run: Run) -> tuple[Any, dict, ProgressView, list]:
    """Run the sweep; return the winning checkpoint, its evaluation, the view and the trial table."""
    from launcher.sweep import find_checkpoint, run_sweep

    board = progress_board()
    with ProgressView(board, run, recipe.metric, recipe.mode) as view:
        trials = run_sweep(recipe, resolved, plan, run, view, board)
    if not view.evals:
        errors = "; ".join(f"{t['name']}: {t['error']}" for t in trials if t["error"]) or "no evaluation reported"
        raise RuntimeError(f"every trial failed: {errors}")
    for t in trials:  # a trial that never sent its end event was stopped early by the scheduler
        t["state"] = "failed" if t["error"] else ("done" if t["name"] in view.stop_reasons else "pruned")
    sign = 1 if recipe.mode == "max" else -1
    best = max(view.evals, key=lambda e: sign * e[recipe.metric])
    return find_checkpoint(run.ray_storage, best["trial"], best["step"]), best, view, trials


# ------------------------------------------------------------------ winner → best/
def pick_winner(result, metric: str, mode: str) -> tuple[Any, dict]:
    candidates = [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if metric in m]
    if not candidates:
        raise RuntimeError("training finished without a reported checkpoint")
    key = (lambda cm: cm[1][metric]) if mode == "max" else (lambda cm: -cm[1][metric])
    return max(candidates, key=key)


def write_best(run: Run, resolved: dict, labels: list[str], ckpt_dir: Path, winner: dict,
               plan: Plan) -> dict:
    """Merge the winning shards into best/ (fp32, whatever the training precision) and check the
    merged model reproduces the metric, evaluating it on the driver's GPU when it has one."""
    from transformers import AutoTokenizer

    from launcher.device import driver_device
    from launcher.evaluate import evaluate_model
    from launcher.model import apply_lora, build_model, merge_lora, warm_start

    if resolved["model"].get("init_from"):  # same shapes as the parent's encoder, this run's head
        model = warm_start(resolved["model"]["init_from"], labels, resolved["model"]["head"],
                           resolved["model"]["init_from_head"])
    else:
        model = build_model(resolved["model"], labels, pretrained=False)
    if resolved["model"].get("lora"):
        apply_lora(model, resolved["model"]["lora"])
    with run.logs.quiet() if run.logs else contextlib.nullcontext():  # zero_to_fp32 prints to stdout
        state = merged_state_dict(ckpt_dir)  # verifies the checkpoint's signatures first
    ckpt_state = read_state(ckpt_dir)  # epoch, step, ZeRO stage, precision of the winning checkpoint
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent = {n for n, _ in model.named_parameters()} | set(model.state_dict())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise RuntimeError(f"merged checkpoint does not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    model = merge_lora(model.eval()).to(driver_device())  # best/ holds a plain encoder: export needs no peft
    tokenizer = AutoTokenizer.from_pretrained(plan.encoder_source)
    dcfg = resolved["data"]
    metrics, reports = {}, {}
    for split in ("validation", "test"):
        if split in plan.dataset.splits:
            result = evaluate_model(model, tokenizer, model.task, labels, plan.dataset.splits[split].examples,
                                    dcfg["max_length"], dcfg["stride"], with_report=True)
            reports[split] = result.pop("report")
            metrics[split] = result
    metrics["reported"] = winner
    tmp = run.dir / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp, tokenizer=tokenizer, extra={
        "max_length": dcfg["max_length"], "stride": dcfg["stride"], "run": run.id,
        "metric": resolved["train"]["metric"] or winner["metric"],
        # the precision it was trained in; the weights in best/ are the fp32 masters
        "training_precision": ckpt_state.get("precision", resolved["deepspeed"]["precision"]),
        "zero_stage": ckpt_state["zero_stage"]})
    atomic_write_json(tmp / "metrics.json", metrics)
    atomic_write_json(tmp / "report.json", reports)
    shutil.rmtree(run.best_dir, ignore_errors=True)
    os.replace(tmp, run.best_dir)
    run.push("best")  # before the status says succeeded, so a reader of the URI never sees half of it
    return metrics


# ------------------------------------------------------------------ launch
def launch_run(recipe: Recipe, resolved: dict, plan: Plan, recipe_path: str, overrides: list[str],
               verbose: bool = False) -> int:
    """Start a new run: allocate its id, record the resolved recipe, train, keep the winner."""
    reg = Registry(resolved["run"]["storage"])
    run = reg.allocate({"task": recipe.model.task, "recipe": str(Path(recipe_path).resolve()), "overrides": list(overrides),
                        "parent": plan.parent, **({"augmentation": plan.augmentation} if plan.augmentation else {})})
    atomic_write(run.dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    run.push("recipe.yaml")
    where = f"{run.location} (working copy {run.dir})" if run.remote else str(run.dir)
    console.print(f"[bold]{run.id}[/] started → {where}  (tensorboard --logdir {run.dir / 'tensorboard'})")
    return execute(run, recipe, resolved, plan, verbose)


def resume_run(run: Run) -> tuple[Recipe, dict]:
    """Check that a run can be resumed and return its recorded recipe."""
    from launcher.recipe import load_recipe

    state = run.status().get("state")
    if state == "succeeded":
        raise ZeroshipError(Problem(run.id, "already succeeded; nothing to resume",
                                    f"export it: zeroship export onnx {run.id}"))
    recipe_file = run.dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise ZeroshipError(Problem(str(recipe_file), "missing: this run cannot be resumed"))
    return load_recipe(recipe_file)


def execute(run: Run, recipe: Recipe, resolved: dict, plan: Plan, verbose: bool = False) -> int:
    """Train (or continue training) `run` and write its winner. Same storage and name as any earlier
    attempt, so Ray Train continues from the latest checkpoint it finds there. Worker and library logs
    go to the run's logs/ folder (launcher.run_logs); `verbose` streams them to the console too."""
    from launcher.observe import RunLogger
    from launcher.run_logs import RunLogs

    started = time.time()
    run.stamps = {"process": startup.process_start(), "plan": started}
    run.logs = RunLogs(run.dir, verbose)
    run.logs.start()
    console.print(f"logs: {run.logs.dir}" + ("" if verbose else "  (launch -v streams them here)"), highlight=False)
    try:
        with run.logs.quiet():  # MLflow announces the experiments it creates
            run.logger = RunLogger(run.dir, run.id, resolved)
        where = connect_ray(recipe, storage=None if run.remote else str(run.dir.parent), log_to_driver=verbose)
        run.logs.reroute()  # ray.init may configure Ray's loggers again
        run.stamps["ray"] = time.time()
        console.print(f"ray: {where}")
        run.update(state="running", error=None)
        extra: dict[str, Any] = {}
        if recipe.sweep is not None and recipe.sweep.kfold:
            winner, metrics, view, extra = fit_kfold(recipe, resolved, plan, run)
        elif recipe.sweep is not None:
            ckpt, reported, view, trials = fit_sweep(recipe, resolved, plan, run)
            params = next(t["params"] for t in trials if t["name"] == reported["trial"])
            winner = {"trial": reported["trial"], "params": params, "epoch": reported["epoch"],
                      "step": reported["step"], "metric": recipe.metric, "value": reported[recipe.metric]}
            best_recipe = yaml.safe_load((run.dir / "trials" / f"{reported['trial']}.yaml").read_text())
            with ckpt.as_directory() as folder:
                metrics = write_best(run, best_recipe, plan.dataset.labels, Path(folder), winner, plan)
            extra["trials"] = [{**t, "best": view.best.get(t["name"])} for t in trials]
        else:
            result, view = fit(recipe, resolved, plan, run)
            ckpt, reported = pick_winner(result, recipe.metric, recipe.mode)
            winner = {"trial": None, "epoch": reported["epoch"], "step": reported["step"],
                      "metric": recipe.metric, "value": reported[recipe.metric]}
            with ckpt.as_directory() as folder:
                metrics = write_best(run, resolved, plan.dataset.labels, Path(folder), winner, plan)
        wall = time.time() - started
        _close_logger(run, "succeeded")
        run.push("trials", "tensorboard")
        run.update(state="succeeded", winner=winner, stop_reason=view.stop_reason, wall_seconds=round(wall, 1),
                   **extra)
    except ZeroshipError as exc:
        _fail(run, exc.render())
        raise
    except KeyboardInterrupt:
        _fail(run, "interrupted")
        raise
    except Exception as exc:
        reason = _describe_failure(exc, recipe.scaling.timeout_s)
        _fail(run, reason)
        run.logs.collect_workers()
        console.print(f"[bold red]{run.id} failed:[/] {escape(reason)}", highlight=False)
        tail = "" if verbose else run.logs.error_tail()
        if tail:
            console.print(f"[dim]{escape(tail)}[/]", highlight=False)
        console.print(f"logs: {run.logs.dir}", highlight=False)
        if os.environ.get("ZEROSHIP_DEBUG"):
            traceback.print_exc()
        return 1
    run.logs.collect_workers()
    if extra.get("cross_validation"):
        print_cv(extra["cross_validation"], recipe.metric, extra["k"])
    elif extra.get("trials"):
        print_trials(extra["trials"], recipe.metric, winner["trial"])
    print_results(run, winner, metrics, view.stop_reason, wall)
    return 0


# what gloo and NCCL say when a collective outlives the process group's timeout
TIMEOUT_SIGNS = ("timed out", "timeout", "watchdog caught collective")


def _describe_failure(exc: Exception, timeout_s: int | None = None) -> str:
    """One line for status.json: for Ray's worker-group errors, the workers' own errors, and what a
    collective timeout means."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        parts = [f"rank {rank}: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                 for rank, err in sorted(failures.items())]
        text = f"{type(exc).__name__}: " + "; ".join(parts)
        if timeout_s is not None and any(sign in str(err).lower() for err in failures.values() for sign in TIMEOUT_SIGNS):
            text = (f"a collective did not finish within scaling.timeout_s={timeout_s} s: a rank hung or died"
                    f" (a stuck GPU, a lost node, a rank in another code path); raise scaling.timeout_s only if a"
                    f" step legitimately takes that long. {text}")
        return _printable(text)
    return _printable(f"{type(exc).__name__}: {exc}")


def _printable(text: str) -> str:
    """Worker errors can carry lone surrogates (gloo's messages do), which no console can print."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _fail(run: Run, error: str) -> None:
    shutil.rmtree(run.dir / ".best.tmp", ignore_errors=True)
    _close_logger(run, "failed")
    run.push("trials", "tensorboard")
    run.update(state="failed", error=error)


def _close_logger(run: Run, state: str) -> None:
    if run.logger is not None:
        run.logger.close(state)
        run.logger = None


def fit_kfold(recipe: Recipe, resolved: dict, plan: Plan, run: Run) -> tuple[dict, dict, ProgressView, dict]:
    """K-fold: every point × fold as a trial; points scored by their fold mean; the best point is
    retrained on all the training data (or, with kfold_refit off, its best fold is kept)."""
    from launcher.sweep import cross_validation, find_checkpoint, run_sweep, trial_recipe

    board = progress_board()
    with ProgressView(board, run, recipe.metric, recipe.mode) as view:
        trials = run_sweep(recipe, resolved, plan, run, view, board)
    failed = [t for t in trials if t["error"]]
    if failed:
        raise RuntimeError("cross-validation needs every fold: " + "; ".join(f"{t['name']}: {t['error']}" for t in failed))
    cv = cross_validation(trials, view.best)
    sign = 1 if recipe.mode == "max" else -1
    top = max(cv, key=lambda e: sign * e["mean"])
    extra = {"k": recipe.sweep.kfold, "cross_validation": cv, "trials": trials}
    summary = {"params": top["params"], "metric": recipe.metric, "cv_mean": top["mean"], "cv_std": top["std"]}
    chosen = trial_recipe(resolved, top["params"])
    if recipe.sweep.kfold_refit:
        board = progress_board()
        child = Recipe.model_validate(chosen)
        trainer = make_trainer(child, worker_config(child, chosen, plan, board, trial="refit"), run.ray_storage, "refit")
        view.progress.console.print(f"refit on all training data: {json.dumps(top['params'])}", highlight=False)
        with ProgressView(board, run, recipe.metric, recipe.mode) as refit_view:
            result = trainer.fit()
        ckpt, reported = pick_winner(result, recipe.metric, recipe.mode)
        winner = {"trial": "refit", "epoch": reported["epoch"], "step": reported["step"],
                  "value": reported[recipe.metric], **summary}
        with ckpt.as_directory() as folder:
            metrics = write_best(run, chosen, plan.dataset.labels, Path(folder), winner, plan)
        view.stop_reasons.update(refit_view.stop_reasons)
    else:
        folds = [e for e in view.evals if any(t["name"] == e["trial"] and t["point"] == top["point"] for t in trials)]
        best = max(folds, key=lambda e: sign * e[recipe.metric])
        winner = {"trial": best["trial"], "epoch": best["epoch"], "step": best["step"],
                  "value": best[recipe.metric], **summary}
        with find_checkpoint(run.ray_storage, best["trial"], best["step"]).as_directory() as folder:
            metrics = write_best(run, chosen, plan.dataset.labels, Path(folder), winner, plan)
    return winner, metrics, view, extra


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


def print_results(run: Run, winner: dict, metrics: dict, stop_reason: str | None, wall: float) -> None:
    trial = f"{winner['trial']}, " if winner.get("trial") else ""
    table = Table(title=f"{run.id} results (winner: {trial}epoch {winner['epoch']}, step {winner['step']})")
    table.add_column("split")
    keys = [k for k in metrics.get("validation", {}) if k.startswith("eval_")]
    for k in keys:
        table.add_column(k.removeprefix("eval_"))
    for split in ("validation", "test"):
        if split in metrics:
            table.add_row(split, *[f"{metrics[split][k]:.4f}" for k in keys])
    console.print(table)
    from launcher.report import print_report

    reports = json.loads((run.best_dir / "report.json").read_text())
    for split, report in reports.items():
        print_report(report, f"{run.id} {split}: per-label report", console)
    if stop_reason:
        console.print(f"stopped: {stop_reason}; wall time {wall:.0f} s")
    console.print(f"[bold green]{run.id} succeeded[/]: {winner['metric']}={winner['value']:.4f} → {run.best_dir}",
                  highlight=False)
    storage = run.remote.uri if run.remote else str(run.dir.parent)
    console.print(f"export it: zeroship export onnx {run.id}" + (
        f" --runs {storage}" if run.remote or run.dir.parent.resolve() != Path("runs").resolve() else ""))
