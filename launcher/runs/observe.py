"""Run observability: TensorBoard event files under `<run>/tensorboard/<trial>/`, and MLflow when the
recipe names a tracking URI (`run.mlflow_uri`).

The driver logs what the workers report through the progress board, so nothing here runs on the
workers and a sweep's trials each get their own TensorBoard folder (`tensorboard --logdir runs/run-7/tensorboard`
shows them side by side).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from zeroship.errors import Problem, RecipeError

# metrics.jsonl key → TensorBoard tag
TRAIN_KEYS = {"train_loss": "train/loss", "lr": "train/lr", "train_samples_per_s": "throughput/samples_per_s",
              "train_tokens_per_s": "throughput/tokens_per_s", "train_step_s": "throughput/step_s",
              "train_peak_gpu_mb": "memory/peak_gpu_mb"}


def tag_for(key: str) -> str | None:
    if key in TRAIN_KEYS:
        return TRAIN_KEYS[key]
    if key.startswith("eval_"):
        return f"eval/{key.removeprefix('eval_')}"
    if key.startswith("train_loss_"):  # each regularization term
        return f"train/loss_{key.removeprefix('train_loss_')}"
    return None


def check_mlflow(uri: str | None) -> None:
    """Fail at --check time, not after training, when MLflow is asked for but missing."""
    if not uri:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise RecipeError(Problem("run.mlflow_uri", f"set to {uri!r}, but the mlflow package is not installed",
                                  "pip install mlflow, or remove run.mlflow_uri")) from None


class RunLogger:
    """TensorBoard writers (one per trial) and an optional MLflow run, fed by the progress view."""

    def __init__(self, run_dir: Path, run_id: str, recipe: dict):
        self.root = Path(run_dir) / "tensorboard"
        self.writers: dict[str, Any] = {}
        self.mlflow = None  # MlflowClient; calls name the run explicitly: the progress view logs from its
        self.mlflow_run = ""  # own thread, where mlflow's thread-local "active run" would be a new, empty one
        uri = recipe.get("run", {}).get("mlflow_uri")
        if uri:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            if "://" not in uri or uri.startswith("file:"):
                # MLflow 3 keeps its folder store only on request; a folder named in the recipe is one
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            client = MlflowClient(tracking_uri=uri)
            name = recipe["run"].get("name") or "zeroship"
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            self.mlflow_run = client.create_run(experiment_id, run_name=run_id).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in flatten(recipe).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(self.mlflow_run, params=params[i:i + 100])
            self.mlflow = client

    def _writer(self, trial: str):
        if trial not in self.writers:
            from tensorboardX import SummaryWriter

            self.writers[trial] = SummaryWriter(str(self.root / (trial or "train")), flush_secs=5)
        return self.writers[trial]

    def log(self, trial: str, step: int, values: dict[str, Any]) -> None:
        scalars = {tag: float(v) for k, v in values.items()
                   if (tag := tag_for(k)) is not None and isinstance(v, (int, float))}
        writer = self._writer(trial)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        if self.mlflow is not None and scalars:
            from mlflow.entities import Metric

            prefix, now = (f"{trial}/" if trial else ""), int(time.time() * 1000)
            self.mlflow.log_batch(self.mlflow_run, metrics=[Metric(prefix + t.replace("/", "_"), v, now, step)
                                                            for t, v in scalars.items()])

    def close(self, state: str | None = None) -> None:
        for writer in self.writers.values():
            writer.close()
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.mlflow_run, "FINISHED" if state in (None, "succeeded") else "FAILED")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} → {"train.lr": 1}"""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
