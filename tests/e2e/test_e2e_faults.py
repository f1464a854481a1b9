"""Fault tolerance with real processes: a worker that dies, and a driver that dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, cli, plant_payload, tiny_ner_recipe

pytestmark = pytest.mark.e2e

# 19 optimizer steps per epoch on the toy data (600 sentences / (2 workers × 16)); evaluate every 5. Two
# epochs, stopped at step 30: the second trains on the windows the first kept (launcher.data.stream), so a
# worker that dies in it leaves a group that must rebuild them, and still retrace the uninterrupted run
FAULTY = dict(train={"epochs": 2, "eval_every": 5, "max_steps": 30}, run={"keep_best": 2})


def evals(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]


def only_run(folder: Path) -> Path:
    (run,) = (folder / "runs").glob("run-*")
    return run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clean")
    res = cli("launch", str(tiny_ner_recipe(folder, **FAULTY)))
    assert res.returncode == 0, res.stderr[-3000:]
    return only_run(folder)


def test_killed_driver_then_dead_worker_resume_and_retrace_the_uninterrupted_run(tmp_path, ray_tmp, uninterrupted):
    """The driver (and the local Ray it started) is killed after the step-10 evaluation; `--resume`
    continues the run from its checkpoint, and in the resumed launch rank 1 dies at step 27, in epoch 2:
    the worker group restarts from the step-25 checkpoint. Data order, optimizer, scheduler and each
    rank's RNG are restored both times, so every evaluation equals the uninterrupted run's at its step."""
    marker = tmp_path / "fault-fired"
    recipe = tiny_ner_recipe(tmp_path, **{**FAULTY, "run": {**FAULTY["run"], "max_failures": 1}})
    env = {**os.environ, "ZEROSHIP_RAY_TMPDIR": ray_tmp, "ZEROSHIP_FAULT": f"1:27:{marker}"}
    driver = subprocess.Popen([str(BIN / "launch"), str(recipe)], cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "runs" / "run-1" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None:
        if metrics.exists() and '"step": 10' in metrics.read_text():
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the run ended before it could be interrupted"
    time.sleep(3)  # let Ray Train persist the step-10 checkpoint it just reported
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    run = tmp_path / "runs" / "run-1"
    assert json.loads((run / "status.json").read_text())["state"] == "running"
    assert not marker.exists()  # killed long before step 27

    res = cli("launch", "--resume", "run-1", "--runs", str(tmp_path / "runs"), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert marker.exists()  # the worker really died at step 27, in the resumed launch
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-1"]  # no new id allocated
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "succeeded"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    resumed = [x["step"] for x in lines if x["kind"] == "resume"]
    # from a checkpoint, not from zero; then from step 25's, not from the launch's start
    assert len(resumed) == 2 and resumed[0] >= 5 and resumed[1] == 25, resumed
    # every evaluation from the first resume point on; up to it, one the killed driver had not
    # written yet may be missing (its checkpoint was persisted, its line in metrics.jsonl not)
    steps = sorted({e["step"] for e in evals(run)})
    assert [s for s in steps if s > resumed[0]] == [s for s in (5, 10, 15, 20, 25, 30) if s > resumed[0]]
    assert status["data"]["train"]["passes"] == 1  # the restarted group's own first pass: its epoch 2's pieces
    clean = {e["step"]: e for e in evals(uninterrupted)}
    for e in evals(run):  # a step evaluated before the kill and again after the resume matches both times
        assert abs(e["eval_loss"] - clean[e["step"]]["eval_loss"]) < 1e-4, (e["step"], e, clean[e["step"]])
        assert e["eval_f1"] == pytest.approx(clean[e["step"]]["eval_f1"], abs=1e-9)
    res = cli("launch", "--resume", "run-1", "--runs", str(tmp_path / "runs"))
    assert res.returncode == 2 and "already succeeded" in res.stderr


def test_dead_worker_without_retries_fails_the_run(tmp_path, ray_tmp):
    marker = tmp_path / "fault-fired"
    recipe = tiny_ner_recipe(tmp_path, **FAULTY)  # max_failures: 0
    res = cli("launch", str(recipe), env={"ZEROSHIP_FAULT": f"0:7:{marker}", "ZEROSHIP_RAY_TMPDIR": ray_tmp,
                                          "COLUMNS": "400"})  # no wrapping inside the paths checked below
    assert res.returncode == 1
    run = only_run(tmp_path)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "rank 0" in status["error"], status
    assert not (run / "best").exists() and not (run / ".best.tmp").exists()
    assert f"{run.name} failed" in res.stdout and f"logs: {run / 'logs'}" in res.stdout

    # Someone who can write the run's storage swaps a shard for a pickle payload: --resume refuses the
    # checkpoint (its signature does not match) before DeepSpeed loads it, and the payload never runs.
    shards = sorted((run / "ray").rglob("mp_rank_00_model_states.pt"))
    assert shards, "the failed run kept no checkpoint"
    payload_ran = tmp_path / "payload-ran"
    for shard in shards:
        plant_payload(shard, payload_ran)
    res = cli("launch", "--resume", run.name, "--runs", str(run.parent), env={"ZEROSHIP_RAY_TMPDIR": ray_tmp})
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "checkpoint refused before loading" in status["error"], status
    assert "mp_rank_00_model_states.pt was changed" in status["error"]
    assert not payload_ran.exists()  # nothing was unpickled
    assert not (run / "best").exists()


def test_hung_rank_fails_the_run_at_the_collective_timeout(tmp_path, ray_tmp):
    """Rank 1 stops answering at step 3 (as a stuck GPU would): rank 0 waits in its next gradient
    all-reduce until scaling.timeout_s, and the run fails with that reason instead of hanging."""
    recipe = tiny_ner_recipe(tmp_path, scaling={"timeout_s": 15})
    started = time.time()
    res = cli("launch", str(recipe), env={"ZEROSHIP_FAULT": "hang:1:3", "ZEROSHIP_RAY_TMPDIR": ray_tmp}, timeout=600)
    assert res.returncode == 1, (res.stdout + res.stderr)[-3000:]
    run = only_run(tmp_path)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed"
    assert "did not finish within scaling.timeout_s=15 s" in status["error"], status["error"]
    assert "scaling.timeout_s=15" in res.stdout and f"{run.name} failed" in res.stdout
    assert not (run / "best").exists()
    assert time.time() - started < 300  # bounded: the timeout, not the test's own limit, ended it
