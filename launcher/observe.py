"""Run observability: TensorBoard event files under `<run>/tensorboard/<trial>/`, and MLflow when the
recipe names a tracking URI (`run.mlflow_uri`).

The driver logs what the workers report through the progress board, so nothing here runs on the
workers and a sweep's trials each get their own TensorBoard folder (`tensorboard --logdir runs/run-7/tensorboard`
shows them side by side).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.errors import Problem, RecipeError

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

    def __init__(self, run_dir: Path, run_id: str, resolved: dict):
        self.root = Path(run_dir) / "tensorboard"
        self.writers: dict[str, Any] = {}
        self.mlflow = None
        uri = resolved.get("run", {}).get("mlflow_uri")
        if uri:
            import mlflow

            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(resolved["run"].get("name") or "zeroship")
            mlflow.start_run(run_name=run_id)
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(resolved).items()})
            self.mlflow = mlflow

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
            prefix = f"{trial}/" if trial else ""
            self.mlflow.log_metrics({prefix + t.replace("/", "_"): v for t, v in scalars.items()}, step=step)

    def close(self, state: str | None = None) -> None:
        for writer in self.writers.values():
            writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status="FINISHED" if state in (None, "succeeded") else "FAILED")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} → {"train.lr": 1}"""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
