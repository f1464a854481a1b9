"""Building the Ray Train `TorchTrainer` for one run or one sweep trial: what every worker receives
(`worker_config`) and how many workers, with what resources, failures and checkpoints (`make_trainer`)."""

from __future__ import annotations

from launcher.data.estimate import DataEstimate
from launcher.driver.plan import Plan
from launcher.recipe.schema import Recipe, tokenizer_source
from launcher.worker.entry import train_worker


def run_datasets(recipe: Recipe, plan: Plan, run) -> tuple[dict, DataEstimate]:
    """The run's splits as lazy Ray Datasets (launcher.data.ingest.build_datasets) and the plan's figures
    the workers start from (launcher.data.estimate): no pass over the corpus comes first."""
    import time

    from launcher.data.estimate import estimate
    from launcher.data.ingest import build_datasets

    same = plan.figures is not None and data_key(recipe) == data_key(plan.recipe)
    figures = plan.figures if same else estimate(recipe, plan.dataset)  # a sweep point over data.max_length
    datasets = build_datasets(recipe, plan.dataset.labels, plan.dataset.splits["train"].examples,
                              figures.train_examples)
    run.stamps.setdefault("datasets", time.time())  # the start-up record's ray_data phase (launcher.driver.startup)
    return datasets, figures


def data_key(recipe: Recipe) -> str:
    """What a run's tokenized data depends on beyond the files: a sweep whose points change one of these
    (data.max_length, data.stride, model.encoder) gets datasets per value; all others share one."""
    import json

    return json.dumps([tokenizer_source(recipe.model), recipe.data.max_length, recipe.data.stride])


def record_data(run, view, figures: DataEstimate | None) -> None:
    """What Ray Data tokenized (the workers' tally of its own statistics: examples in, windows out, passes)
    next to the plan's figures, on the console and in status.json (`data`)."""
    from launcher.driver.console import console

    made = view.data.get("") or next(iter(view.data.values()), None)  # a sweep: its first trial's
    record: dict = {"plan": figures.to_json()} if figures is not None else {}
    shown = []
    if run.shared_data:  # a sweep: each data variant tokenized once for its trials (or why not), and each
        record["shared"] = run.shared_data  # trial's own tally
        record["trials"] = dict(view.data)
        for v in run.shared_data:
            shown += [f"{name} {v[name].get('examples', '?')} examples → {v[name]['windows']} windows once for"
                      f" {v['trials']} trials" for name in ("train", "validation") if name in v]
    if made:
        record.update(made)
        # a max_steps run may end inside its first pass; a sweep's trial may tokenize nothing itself
        shown += [f"{name} {c['examples']} examples → {c['windows']} windows in {c['passes']} pass(es)"
                  for name, c in made.items() if c["passes"] and c["examples"]]
    if shown:
        console.print("data (Ray Data): " + ", ".join(shown), highlight=False)
    run.update(data=record)


def worker_config(recipe: Recipe, plan: Plan, board, figures: DataEstimate | None, trial: str = "",
                  tokenized: list[str] | tuple = ()) -> dict:
    """What every worker receives: the Recipe (pydantic: it pickles), labels, the plan's data figures (the
    data itself comes as Ray Datasets, `make_trainer`), the progress board; `tokenized`: the splits that
    come tokenized already (`tokenized_splits`)."""
    return {"recipe": recipe, "labels": plan.dataset.labels, "figures": figures, "progress": board,
            "metric": recipe.metric, "mode": recipe.mode, "trial": trial, "tokenized": list(tokenized)}


def tokenized_splits(datasets: dict) -> list[str]:
    """The splits that come tokenized already (materialized for a sweep's trials,
    launcher.driver.sweep.tokenize_once): the workers' tally then counts no tokenization of their own
    (launcher.data.stream.Tally)."""
    from ray.data.dataset import MaterializedDataset

    return [name for name, ds in datasets.items() if isinstance(ds, MaterializedDataset)]


def shard_config():
    """Ray Train's DataConfig, but validation split unevenly: `equal=True` (the default, right for
    training: the same number of batches on every rank) would drop validation rows. Order is kept, so
    a rank's shard is the same in every attempt (a resume replays its epoch exactly). A single worker
    gets each dataset whole, as a plain iterator that runs Ray Data's executor in the worker: a
    streaming split of one starts a SplitCoordinator actor per dataset, a Python process each (~3.5
    CPU-s apiece on 2 cores) that only forwards every block."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    from zeroship.ray_compat import execution_options

    class ShardConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            if world_size == 1:
                return [{name: self.prepared(name, ds).iterator() for name, ds in datasets.items()}]
            # Ray Train (V2) asks for one dataset at a time
            train = {name: ds for name, ds in datasets.items() if name != "validation"}
            out = super().configure(train, world_size, worker_handles, worker_node_ids, **kwargs)
            if "validation" in datasets:
                val = self.prepared("validation", datasets["validation"])
                for i, split in enumerate(val.streaming_split(world_size, equal=False)):
                    out[i]["validation"] = split
            return out

        def prepared(self, name, ds):
            """A copy of `ds` named and with the execution options Ray Train gives the datasets it shards."""
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = execution_options(self, name)
            return ds

    return ShardConfig(execution_options=ExecutionOptions(preserve_order=True))


def trainer_class(lean: bool):
    """Ray Train's TorchTrainer; on a lean private Ray (zeroship.ray_session.lean: one run, no
    dashboard) without the placement-group cleaner Ray Train adds to every run. The cleaner is a
    detached actor that frees a run's placement group when its controller dies while Ray lives on.
    A single run's controller dies only with the driver, and a private Ray with it, placement
    groups and all; so there it would only cost a Python process, and with no dashboard to answer
    its State API queries log a warning every second. A sweep with a scheduler keeps it (and the
    dashboard): Tune stops a pruned trial by killing its actor, controller included, and the trial's
    leaked placement group would hold its worker's CPU until the launch ends (measured: an ASHA sweep
    on 2 cores then starved Ray Data of its CPU and hung). A grid or k-fold sweep without one ends
    every trial's fit normally, as a single run ends, and goes without (launcher.driver.cluster.
    stops_trials_early): one Python process less per trial, ~2 CPU-s each on 2 cores."""
    from ray.train.torch import TorchTrainer

    if not lean:
        return TorchTrainer
    from zeroship.ray_compat import without_placement_group_cleaner

    return without_placement_group_cleaner(TorchTrainer)


def make_trainer(recipe: Recipe, config: dict, storage: str, name: str, datasets: dict,
                 callbacks: list | None = None, lean: bool = False):
    import ray.train
    from ray.train.torch import TorchConfig

    sc = recipe.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    return trainer_class(lean)(
        train_worker,
        train_loop_config=config,
        datasets=datasets, dataset_config=shard_config(),
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
