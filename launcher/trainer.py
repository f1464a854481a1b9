"""Building the Ray Train `TorchTrainer` for one run or one sweep trial: what every worker receives
(`worker_config`) and how many workers, with what resources, failures and checkpoints (`make_trainer`)."""

from __future__ import annotations

from launcher.data import examples_to_dicts
from launcher.plan import Plan
from launcher.recipe import Recipe
from launcher.worker import train_worker


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
