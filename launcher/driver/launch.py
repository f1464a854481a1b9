"""The driver: allocate the run, connect to Ray, fit a TorchTrainer, keep the winner.

Flow: allocate `run-N` → write recipe.yaml → ray (cluster if one is there, else a local one on
127.0.0.1) → TorchTrainer(train_worker) with a live progress display → pick the best checkpoint
by the recipe's metric → merge its ZeRO shards into `best/` (written to a temp folder, renamed
into place only once complete) → evaluate the merged model again → status `succeeded`.

The parts live beside it: `cluster` (joining Ray, cluster checks), `trainer` (the TorchTrainer and what
each worker receives), `console` (progress and result tables), `winner` (the merge into `best/`),
`sweep` (trials and k-fold).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.markup import escape

from launcher.driver import startup
from launcher.driver.cluster import connect_ray
from launcher.driver.console import (
    ProgressView,
    console,
    print_cv,
    print_results,
    print_trials,
    progress_board,
)
from launcher.driver.plan import Plan
from launcher.driver.trainer import (
    data_key,
    make_trainer,
    record_data,
    run_datasets,
    tokenized_splits,
    worker_config,
)
from launcher.driver.winner import Winner, pick_winner, write_best
from launcher.eval.ranking import best
from launcher.recipe.schema import Recipe
from launcher.runs.registry import Registry, Run, atomic_write
from zeroship.errors import DataError, Problem, RunFailed, ZeroshipError
from zeroship.ray_session import lean


@dataclass
class FitResult:
    """What every way of fitting (one run, a sweep, k-fold) hands back: the winner, merged into best/."""

    winner: Winner
    metrics: dict  # best/'s metrics per split, evaluated again after the merge
    view: ProgressView
    extra: dict = field(default_factory=dict)  # status.json's trials / cross_validation / k


def fit(plan: Plan, run: Run) -> FitResult:
    recipe, board = plan.recipe, progress_board()
    datasets, figures = run_datasets(recipe, plan, run)
    run.data_figures = figures
    trainer = make_trainer(recipe, worker_config(recipe, plan, board, figures), run.ray_storage, "train",
                           datasets, lean=lean())
    with ProgressView(board, run, recipe.metric, recipe.mode) as view:
        result = trainer.fit()
    ckpt, reported = pick_winner(result, recipe.metric, recipe.mode)
    winner = Winner.reported(reported, recipe.metric)
    with ckpt.as_directory() as folder:
        metrics = write_best(run, recipe, plan.dataset.labels, Path(folder), winner, plan)
    return FitResult(winner, metrics, view)


def fit_sweep(plan: Plan, run: Run) -> FitResult:
    """Run the sweep; keep the best evaluation of any trial (its checkpoint at that step)."""
    from launcher.driver.sweep import find_checkpoint, run_sweep, trial_recipe

    recipe, board = plan.recipe, progress_board()
    with ProgressView(board, run, recipe.metric, recipe.mode) as view:
        trials = run_sweep(recipe, plan, run, view, board)
    if not view.evals:
        errors = "; ".join(f"{t['name']}: {t['error']}" for t in trials if t["error"]) or "no evaluation reported"
        raise RunFailed(f"every trial failed: {errors}")
    for t in trials:  # a trial that never sent its end event was stopped early by the scheduler
        t["state"] = "failed" if t["error"] else ("done" if t["name"] in view.stop_reasons else "pruned")
    top = best(view.evals, recipe.mode, key=lambda e: e[recipe.metric])
    params = next(t["params"] for t in trials if t["name"] == top["trial"])
    winner = Winner.reported(top, recipe.metric, trial=top["trial"], params=params)
    with find_checkpoint(run.ray_storage, top["trial"], top["step"]).as_directory() as folder:
        metrics = write_best(run, trial_recipe(recipe, params), plan.dataset.labels, Path(folder), winner, plan)
    return FitResult(winner, metrics, view, {"trials": [{**t, "best": view.best.get(t["name"])} for t in trials]})


# ------------------------------------------------------------------ launch
def launch_run(plan: Plan, recipe_path: str, overrides: list[str], verbose: bool = False) -> int:
    """Start a new run: allocate its id, record the recipe as it runs, train, keep the winner."""
    recipe = plan.recipe
    reg = Registry(recipe.run.storage)
    run = reg.allocate(
        {
            "task": recipe.model.task,
            "recipe": str(Path(recipe_path).resolve()),
            "cwd": os.getcwd(),  # data paths under it are found again from a checkout (Run.recorded_data)
            "overrides": list(overrides),
            "parent": plan.parent,
            **({"augmentation": plan.augmentation} if plan.augmentation else {}),
        }
    )
    atomic_write(run.dir / "recipe.yaml", yaml.safe_dump(recipe.as_dict(), sort_keys=False))
    run.push("recipe.yaml")
    where = f"{run.location} (working copy {run.dir})" if run.remote else str(run.dir)
    console.print(f"[bold]{run.id}[/] started → {where}  (tensorboard --logdir {run.dir / 'tensorboard'})")
    return execute(run, plan, verbose)


def resume_run(run: Run) -> Recipe:
    """Check that a run can be resumed and return its recorded recipe."""
    from launcher.recipe.schema import load_recipe

    state = run.status().get("state")
    if state == "succeeded":
        raise ZeroshipError(Problem(run.id, "already succeeded; nothing to resume",
                                    f"export it: zeroship export onnx {run.id}"))
    recipe_file = run.dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise ZeroshipError(Problem(str(recipe_file), "missing: this run cannot be resumed"))
    recipe = load_recipe(recipe_file)
    if "label_all_tokens" not in (yaml.safe_load(recipe_file.read_text()).get("data") or {}):
        recipe = recipe.updated({"data.label_all_tokens": False})  # recorded before the option: first sub-tokens
    return recipe


def execute(run: Run, plan: Plan, verbose: bool = False) -> int:
    """Train (or continue training) `run` and write its winner. Same storage and name as any earlier
    attempt, so Ray Train continues from the latest checkpoint it finds there. Worker and library logs
    go to the run's logs/ folder (launcher.runs.run_logs); `verbose` streams them to the console too."""
    from launcher.runs.observe import RunLogger
    from launcher.runs.run_logs import RunLogs

    recipe, started = plan.recipe, time.time()
    run.stamps = {"process": startup.process_start(), "plan": started}
    run.logs = RunLogs(run.dir, verbose)
    run.logs.start()
    console.print(f"logs: {run.logs.dir}" + ("" if verbose else "  (launch -v streams them here)"), highlight=False)
    try:
        imports = _import_in_background()
        with run.logs.quiet():  # MLflow announces the experiments it creates
            run.logger = RunLogger(run.dir, run.id, recipe.as_dict())
        where = connect_ray(recipe, storage=None if run.remote else str(run.dir.parent), log_to_driver=verbose)
        imports.join()
        import ray.data  # noqa: F401  (importing it gives Ray Data's logger a console handler: reroute takes it)

        run.logs.reroute()  # ray.init may configure Ray's loggers again
        run.stamps["ray"] = time.time()
        console.print(f"ray: {where}")
        run.update(state="running", error=None)
        fitter = fit_kfold if recipe.sweep is not None and recipe.sweep.kfold else (
            fit_sweep if recipe.sweep is not None else fit)
        res = fitter(plan, run)
        record_data(run, res.view, run.data_figures)
        wall = time.time() - started
        _close_logger(run, "succeeded")
        run.push("trials", "tensorboard")
        run.update(state="succeeded", winner=res.winner.to_json(), stop_reason=res.view.stop_reason,
                   wall_seconds=round(wall, 1), **res.extra)
    except ZeroshipError as exc:
        _fail(run, exc.render())
        raise
    except KeyboardInterrupt:
        _fail(run, "interrupted")
        raise
    except Exception as exc:
        data_error = _data_error(exc)
        if data_error is not None:  # a line the stream reached, or a label outside the run's set
            _fail(run, data_error.render())
            run.logs.collect_workers()
            raise data_error from None
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
    if res.extra.get("cross_validation"):
        print_cv(res.extra["cross_validation"], recipe.metric, res.extra["k"])
    elif res.extra.get("trials"):
        print_trials(res.extra["trials"], recipe.metric, res.winner.trial)
    print_results(run, res.winner, res.metrics, res.view.stop_reason, wall)
    return 0


def _import_in_background() -> threading.Thread:
    """Import what the trainer needs next (torch, through Ray Train's TorchTrainer, and Ray Data) in a
    thread, while `ray.init` waits for Ray's processes to come up: 3-6 s off the start-up on 2 cores
    (the imports take ~6 s alone and `ray.init` leaves a third of the cores idle). A failed import
    is left for the main thread to raise where it imports the same module."""
    def run() -> None:
        with contextlib.suppress(Exception):
            import ray.data  # noqa: F401
            import ray.train.torch  # noqa: F401

    thread = threading.Thread(target=run, name="zeroship-imports", daemon=True)
    thread.start()
    return thread


# what gloo and NCCL say when a collective outlives the process group's timeout
TIMEOUT_SIGNS = ("timed out", "timeout", "watchdog caught collective")


def _data_error(exc: Exception) -> DataError | None:
    """The data problem behind a failed run, if that is what stopped it: a worker's stream raises the
    DataError a Ray Data task found (launcher.data.stream.data_errors), which comes back inside Ray Train's
    WorkerGroupError."""
    from ray.train import WorkerGroupError

    from launcher.data.ingest import unwrap

    failures = list(exc.worker_failures.values()) if isinstance(exc, WorkerGroupError) else [exc]
    for err in failures:
        found = unwrap(err)
        if isinstance(found, DataError):
            return DataError(found.problems, title=found.title)
    return None


def _describe_failure(exc: Exception, timeout_s: int | None = None) -> str:
    """One line for status.json: for Ray's worker-group errors, the workers' own errors, and what a
    collective timeout means."""
    from ray.train import WorkerGroupError

    if isinstance(exc, RunFailed):
        return _printable(str(exc))
    failures = exc.worker_failures if isinstance(exc, WorkerGroupError) else None
    if failures:
        parts = [f"rank {rank}: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                 for rank, err in sorted(failures.items())]
        text = f"{type(exc).__name__}: " + "; ".join(parts)
        if timeout_s is not None and any(
            sign in str(err).lower() for err in failures.values() for sign in TIMEOUT_SIGNS
        ):
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
    # the plan's data figures, as a run that succeeds records them (its Ray Data tally never came)
    plan = {} if run.data_figures is None else {"data": {"plan": run.data_figures.to_json()}}
    run.update(state="failed", error=error, **plan)


def _close_logger(run: Run, state: str) -> None:
    if run.logger is not None:
        run.logger.close(state)
        run.logger = None


def fit_kfold(plan: Plan, run: Run) -> FitResult:
    """K-fold: every point × fold as a trial; points scored by their fold mean; the best point is
    retrained on all the training data (or, with kfold_refit off, its best fold is kept)."""
    from launcher.driver.sweep import cross_validation, find_checkpoint, run_sweep, trial_recipe

    recipe, board = plan.recipe, progress_board()
    with ProgressView(board, run, recipe.metric, recipe.mode) as view:
        trials = run_sweep(recipe, plan, run, view, board)
    failed = [t for t in trials if t["error"]]
    if failed:
        raise RunFailed("cross-validation needs every fold: " + "; ".join(f"{t['name']}: {t['error']}" for t in failed))
    cv = cross_validation(trials, view.best)
    top = best(cv, recipe.mode, key=lambda e: e["mean"])
    extra = {"k": recipe.sweep.kfold, "cross_validation": cv, "trials": trials}
    summary = {"params": top["params"], "cv_mean": top["mean"], "cv_std": top["std"]}
    chosen = trial_recipe(recipe, top["params"])
    if recipe.sweep.kfold_refit:
        board = progress_board()
        # the trials' tokenization of its data variant, when they shared one (launcher.driver.sweep.tokenize_once)
        datasets, figures = run.sweep_datasets.get(data_key(chosen)) or run_datasets(chosen, plan, run)
        trainer = make_trainer(chosen, worker_config(chosen, plan, board, figures, trial="refit",
                                                     tokenized=tokenized_splits(datasets)),
                               run.ray_storage, "refit", datasets, lean=lean())
        view.progress.console.print(f"refit on all training data: {json.dumps(top['params'])}", highlight=False)
        with ProgressView(board, run, recipe.metric, recipe.mode) as refit_view:
            result = trainer.fit()
        ckpt, reported = pick_winner(result, recipe.metric, recipe.mode)
        winner = Winner.reported(reported, recipe.metric, trial="refit", **summary)
        with ckpt.as_directory() as folder:
            metrics = write_best(run, chosen, plan.dataset.labels, Path(folder), winner, plan)
        view.stop_reasons.update(refit_view.stop_reasons)
    else:
        folds = [e for e in view.evals if any(t["name"] == e["trial"] and t["point"] == top["point"] for t in trials)]
        kept = best(folds, recipe.mode, key=lambda e: e[recipe.metric])
        winner = Winner.reported(kept, recipe.metric, trial=kept["trial"], **summary)
        with find_checkpoint(run.ray_storage, kept["trial"], kept["step"]).as_directory() as folder:
            metrics = write_best(run, chosen, plan.dataset.labels, Path(folder), winner, plan)
    return FitResult(winner, metrics, view, extra)
