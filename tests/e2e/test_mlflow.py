"""run.mlflow_uri for real: the shared NER run logs to an MLflow file store, the shared classification run
to an `mlflow server` on 127.0.0.1; MLflow's own client must read back the run's parameters (its resolved
recipe) and the metric history written to metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher.runs.observe import flatten

pytestmark = pytest.mark.e2e


def check_run_in_mlflow(uri: str, run_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(recipe["run"]["name"] or "zeroship")
    assert experiment is not None
    # one MLflow run, named after ours, holds everything (none made behind its back by another thread)
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run_dir.name
    assert found.info.status == "FINISHED"
    assert found.data.params == {k: str(v)[:500] for k, v in flatten(recipe).items()}
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert evals
    for key in [k for k in evals[0] if k.startswith("eval_")]:
        history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, key))
        assert history == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-9)) for r in evals], key
    losses = client.get_metric_history(found.info.run_id, "train_loss")
    assert losses and all(m.value > 0 for m in losses)


def test_file_store_holds_the_runs_params_and_metric_history(ner_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as launcher.runs.observe sets it for a folder
    check_run_in_mlflow(str(ner_run.parent.parent / "mlruns"), ner_run)


def test_tracking_server_holds_the_runs_params_and_metric_history(cls_run, mlflow_server):
    check_run_in_mlflow(mlflow_server, cls_run)
