"""Sweeps: one Ray Tune trial per point of the recipe's `sweep`, each fitting its own TorchTrainer.

This is the Train V2 pattern (a Tune function trainable that builds and fits a TorchTrainer with
`TuneReportCallback`); `Tuner(TorchTrainer(...))` is refused by Train V2. The winner is the best
evaluation over every trial and every evaluation; its checkpoint is found by the step recorded
inside each checkpoint folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from launcher.driver.plan import DATA_CPUS
from launcher.recipe.schema import Recipe, set_dotted, sweep_points
from launcher.runs.registry import Run, atomic_write
from launcher.worker.checkpoint import STATE_FILE
from zeroship.errors import RunFailed
from zeroship.ray_session import lean


def trial_recipe(recipe: Recipe, params: dict[str, Any]) -> Recipe:
    """The base recipe with one sweep point applied and the sweep section removed (validated again: a
    point may set any field)."""
    trial = recipe.as_dict()
    trial["sweep"] = None
    for key, value in params.items():
        set_dotted(trial, key, value)
    return Recipe.model_validate(trial)


def sweep_trial(config: dict, shared: dict) -> None:
    """Tune function trainable: runs one trial's distributed training to completion."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from launcher.driver.trainer import make_trainer, tokenized_splits

    trial = config["trial"]
    recipe = trial_recipe(shared["recipe"], trial["params"])
    datasets, figures = shared["datasets"][trial["data"]]  # this trial's data variant (run_sweep)
    tokenized = tokenized_splits(datasets)
    if trial.get("fold") is not None:  # k-fold: validate on this fold, train on the others
        from launcher.data.ingest import fold_datasets

        datasets = fold_datasets(datasets["train"], shared["kfold"], trial["fold"])
        figures = shared["fold_figures"][trial["data"], trial["fold"]]
        tokenized = list(datasets) if "train" in tokenized else []  # both filter the train split
    worker_cfg = dict(shared["worker_config"], recipe=recipe, trial=trial["name"], figures=figures,
                      tokenized=tokenized)
    trainer = make_trainer(recipe, worker_cfg, shared["storage"], trial["name"], datasets,
                           callbacks=[TuneReportCallback()], lean=shared["lean"])
    trainer.fit()


def max_concurrent(recipe: Recipe) -> int:
    """How many trials the cluster can run at once, given each trial's workers."""
    import ray

    if recipe.sweep.max_concurrent:
        return recipe.sweep.max_concurrent
    sc = recipe.scaling
    cpus = ray.cluster_resources().get("CPU", 1) - DATA_CPUS
    fit = int(cpus // (sc.workers * sc.cpus_per_worker))
    if sc.use_gpu:
        fit = min(fit, int(ray.cluster_resources().get("GPU", 0) // (sc.workers * sc.gpus_per_worker)))
    return max(1, fit)


def run_sweep(recipe: Recipe, plan, run: Run, view, board) -> list[dict]:
    """Run every trial; returns the trial table (name, params, state, error)."""
    import ray.tune as tune
    from ray.tune.schedulers import ASHAScheduler

    from launcher.driver.trainer import worker_config

    points = sweep_points(recipe)
    k = recipe.sweep.kfold
    if k:
        trials = [{"name": f"trial-{j * k + f}", "params": p, "point": j, "fold": f}
                  for j, p in enumerate(points) for f in range(k)]
    else:
        trials = [{"name": f"trial-{i}", "params": p, "point": i, "fold": None} for i, p in enumerate(points)]
    (run.dir / "trials").mkdir(exist_ok=True)
    if k:  # how the folds were made and how many training examples each holds out
        from launcher.data.ingest import fold_sizes

        sizes = fold_sizes(recipe.as_dict()["data"], recipe.model.task, k)
        if not min(sizes):
            from zeroship.errors import DataError, Problem

            raise DataError(Problem("sweep.kfold", f"{k} folds of {sum(sizes)} training examples leave a fold with"
                                    f" none to validate on (held out per fold: {sizes})", "lower sweep.kfold"))
        atomic_write(run.dir / "trials" / "folds.json", json.dumps(
            {"k": k, "fold_of_example": "blake2b (8-byte digest) of its where (file:line), big-endian, mod k",
             "held_out": sizes}) + "\n")
    from launcher.data.estimate import estimate
    from launcher.driver.trainer import data_key, run_datasets

    variants: dict[str, int] = {}  # data_key → index in datasets: a sweep over data.max_length tokenizes per value
    datasets, fold_figures = [], {}
    for t in trials:  # each trial's recipe, as it will run, and the data variant it trains on
        point = trial_recipe(recipe, t["params"])
        atomic_write(run.dir / "trials" / f"{t['name']}.yaml", yaml.safe_dump(point.as_dict(), sort_keys=False))
        key = data_key(point)
        if key not in variants:
            variants[key] = len(datasets)
            datasets.append(run_datasets(point, plan, run))
        t["data"] = variants[key]
        if k:  # the fold's own figures: its training windows, from what the plan holds
            fold_figures.setdefault((t["data"], t["fold"]), estimate(point, plan.dataset, (k, t["fold"])))
    run.data_figures = datasets[0][1]
    run.shared_data = tokenize_once(datasets, trials, k, bool(k and recipe.sweep.kfold_refit), view)
    run.sweep_datasets = {key: datasets[i] for key, i in variants.items()}  # the k-fold refit's (launch.fit_kfold)
    view.expect_trials(trials)
    shared = {"recipe": recipe, "worker_config": worker_config(recipe, plan, board, None),
              "storage": run.ray_storage, "datasets": datasets, "kfold": k, "fold_figures": fold_figures,
              "lean": lean()}  # without a scheduler no trial is killed: no placement-group cleaner
    scheduler = None
    if recipe.sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=recipe.metric, mode=recipe.mode,
                                  grace_period=1, reduction_factor=2, max_t=10**6)
    # A trial's own process only waits on its TorchTrainer: it takes no CPU (else trials could hold
    # every CPU and no worker would ever start); a token of memory keeps its resource request valid.
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, shared=shared), {"CPU": 0, "memory": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent(recipe), scheduler=scheduler),
        run_config=tune.RunConfig(name="sweep", storage_path=shared["storage"], verbose=0),
    )
    grid = tuner.fit()
    table = []
    for result in grid:
        name = result.config["trial"]["name"]
        error = None
        if result.error is not None and not _stopped_by_scheduler(result.error):
            error = f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1]}"
        t = result.config["trial"]
        table.append({"name": name, "params": t["params"], "point": t["point"], "fold": t["fold"], "error": error})
    return sorted(table, key=lambda t: int(t["name"].split("-")[1]))


def tokenize_once(datasets: list[tuple[dict, Any]], trials: list[dict], k: int, refit: bool, view) -> list[dict]:
    """Trials that train on the same data variant (launcher.driver.trainer.data_key) read one tokenization
    of it: when the plan keeps the windows (`data.cache_mb`), the driver materializes the variant's splits
    in Ray's object store (spilling to disk beyond it) before the first trial, instead of every trial's
    workers reading, parsing and tokenizing the corpus again. The blocks are the driver's, so they outlive
    each trial; a k-fold trial filters its folds out of the materialized train split (the validation split
    is read by the refit alone, so it stays streamed). The trials' workers still keep their own pass's
    windows for their later epochs' global shuffle (launcher.data.stream). Each variant is replaced in
    `datasets`; returns, per variant, what Ray Data tokenized (its own statistics) or why it streams."""
    from collections import Counter

    from zeroship.ray_compat import dataset_operator_rows

    readers = Counter(t["data"] for t in trials)
    names = ["train"] if k else ["train", "validation"]
    record = []
    for i, (splits, figures) in enumerate(datasets):
        entry: dict[str, Any] = {"variant": i, "trials": readers[i]}
        if readers[i] + (1 if refit else 0) < 2 or not figures.cache:
            entry["tokenized"] = ("by its one trial's workers" if figures.cache else
                                  f"by each trial's workers (≈ {figures.megabytes:,.0f} MB > data.cache_mb "
                                  f"{figures.cache_mb})")
            record.append(entry)
            continue
        view.progress.console.print(f"data: tokenizing {' and '.join(names)} once for {readers[i]} trials"
                                    + (" and the refit" if refit else ""), highlight=False)
        kept = dict(splits)
        for name in names:
            kept[name] = splits[name].materialize()
            rows = dataset_operator_rows(kept[name], "tokenize_batch")
            entry[name] = ({"examples": rows[0], "windows": rows[1]} if rows is not None
                           else {"windows": kept[name].count()})
        entry["tokenized"] = "once, by Ray Data tasks before the first trial"
        datasets[i] = (kept, figures)
        record.append(entry)
    return record


def cross_validation(trials: list[dict], best: dict[str, float]) -> list[dict]:
    """Per sweep point: each fold's best metric, their mean and sample standard deviation."""
    import statistics

    points: dict[int, dict] = {}
    for t in trials:
        entry = points.setdefault(t["point"], {"point": t["point"], "params": t["params"], "folds": {}})
        if t["name"] in best:
            entry["folds"][t["fold"]] = best[t["name"]]
    out = []
    for entry in points.values():
        values = [entry["folds"][f] for f in sorted(entry["folds"])]
        entry["folds"] = values
        entry["mean"] = statistics.fmean(values) if values else None
        entry["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return sorted(out, key=lambda e: e["point"])


def _stopped_by_scheduler(error: BaseException) -> bool:
    # ASHA stops a trial by killing its actors; fit() inside the trial then raises ActorDiedError
    return "ActorDied" in type(error).__name__ or "ActorDied" in str(error)


def find_checkpoint(storage: str, trial: str, step: int):
    """The checkpoint a trial reported at `step` (each holds its own step in STATE_FILE), as a
    ray.train.Checkpoint: `storage` is a path or a URI (launcher.runs.storage)."""
    import pyarrow.fs
    import ray.train

    fs, base = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else f"file://{Path(storage).resolve()}")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{base}/{trial}", allow_not_found=True))
    for info in sorted(i.path for i in infos if Path(i.path).name.startswith("checkpoint_")):
        try:
            with fs.open_input_stream(f"{info}/{STATE_FILE}") as fh:
                state = json.loads(fh.read())
        except FileNotFoundError:
            continue
        if state["step"] == step:
            return ray.train.Checkpoint(path=info, filesystem=fs)
    raise RunFailed(f"the checkpoint of {trial} at step {step} is gone (raise run.keep_best?)")
