"""What `launch` prints: by default the plan, progress, evaluations, results and real errors, and nothing
from Ray, the workers or the libraries (those go to runs/run-N/logs/); and two launches at once on one
machine, each with its own private Ray on loopback, both succeed and leave nothing running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, listeners_of, tiny_ner_recipe, toy_ner_shards

pytestmark = pytest.mark.e2e

# what reached the console before the logs had a place of their own
NOISE = ["(RayTrainWorker", "(TrainController", "TrainingReport(", "core_worker.cc", "PreemptionWatcher",
         "Loading weights", "Loading checkpoint shards", "deepspeed_shm_comm_op", "Processing zero checkpoint",
         "Reconstructed fp32", "real_accelerator.py", "Token authentication is enabled", "Started a local Ray",
         "FutureWarning", "Found multiple active Ray instances"]


def test_quickstart_style_run_prints_only_its_own_lines(ner_run):
    console = (ner_run.parent.parent / "console.txt").read_text()
    for noise in NOISE:
        assert noise not in console, (noise, console[-3000:])
    lines = [line for line in console.splitlines() if line.strip()]
    tail = console[console.rindex("export it:"):].split()  # the last thing printed (rich may wrap it)
    assert tail == ["export", "it:", "zeroship", "export", "onnx", ner_run.name, "--runs", str(ner_run.parent)], tail
    assert f"logs: {ner_run / 'logs'}" in console
    assert sum("eval_f1=" in line for line in lines) >= 2  # one line per evaluation
    # ... and the logs kept what the console did not show
    driver = (ner_run / "logs" / "driver.log").read_text()
    assert "Reconstructed fp32" in driver  # DeepSpeed's merge output
    workers = "".join(p.read_text(errors="replace") for p in (ner_run / "logs" / "workers").iterdir())
    assert "TrainingReport(" in workers or "Reporting training result" in workers


def _ray_processes(tmp: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", tmp], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_two_launches_at_once_each_use_only_their_own_ray_on_loopback(tmp_path):
    """Two launches on one machine at once, each with its own private Ray: both succeed, neither sees the
    other's Ray, and both leave nothing running. One of them (b) runs with -v, so its workers' output
    streams to its console; the other (a) is quiet.

    a also stands for a single-worker run (so the suite spends one launch on both): 1 worker × 2 threads
    at ZeRO-0 trains for `train.max_steps`, past the recipe's one epoch, reading its train split from a
    glob of JSONL shards; meanwhile every socket its private Ray listens on (driver, GCS, raylet, agents,
    workers: all descendants of `launch`) is bound to loopback. One exception, outside our reach:
    torch.distributed's TCPStore (the rendezvous rank 0 hosts) binds every interface whatever host it is
    given (`dist.TCPStore("127.0.0.1", ...)` listens on ::)."""
    import psutil

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shards = toy_ner_shards(a / "shards", "jsonl", 2)
    recipes = {
        "a": tiny_ner_recipe(a, scaling={"workers": 1, "cpus_per_worker": 2}, deepspeed={"zero_stage": 0},
                             data={"format": "jsonl", "train": str(shards / "part-*.jsonl"),
                                   "validation": str(toy_ner_shards(a / "val", "jsonl", 1, "validation"))},
                             train={"epochs": 1, "batch_size": 32, "max_steps": 25, "schedule": "linear"}),
        "b": tiny_ner_recipe(b, scaling={"workers": 1}, deepspeed={"zero_stage": 0},
                             model={"num_hidden_layers": 1}, train={"max_steps": 8}),  # not about training
    }
    # a listens on loopback without being told to: no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER from this process
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    procs = []
    for name, recipe in recipes.items():
        ray_tmp = f"/tmp/zs-{name}{os.getpid()}"
        args = [str(BIN / "launch"), str(recipe)] + (["-v"] if name == "b" else [])
        procs.append((tmp_path / name, ray_tmp, subprocess.Popen(
            args, cwd=ROOT, env={**base, "ZEROSHIP_RAY_TMPDIR": ray_tmp},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    listeners: dict[str, str] = {}
    first = procs[0][2]
    deadline = time.time() + 600
    while first.poll() is None and time.time() < deadline:
        try:
            listeners.update({f"{ip}:{port}": name for name, ip, port in listeners_of(first.pid)})
        except psutil.NoSuchProcess:  # launch itself just exited
            break
        time.sleep(2)  # every listener lives the whole run (~60 s): each sweep reads ~20 processes' sockets
    outputs = [proc.communicate(timeout=900)[0] for _, _, proc in procs]
    for (folder, ray_tmp, proc), output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
        assert "succeeded" in output
        logs = "".join(
            p.read_text(errors="replace") for p in (folder / "runs" / "run-1" / "logs").rglob("*") if p.is_file()
        )
        for text in (output, logs):
            assert "Found multiple active Ray instances" not in text
            assert "Failed to query Ray Train Controller" not in text
        if folder.name == "a":  # quiet: only its own lines, none of them an error
            assert "(RayTrainWorker" not in output
            assert not [line for line in output.splitlines() if "error" in line.lower()], output[-3000:]
        else:
            assert "(RayTrainWorker" in output  # -v streams the workers' output
    deadline = time.time() + 60  # Ray's processes take a moment to exit after the driver does
    while time.time() < deadline and any(_ray_processes(t) for _, t, _ in procs):
        time.sleep(1)
    for _, ray_tmp, _ in procs:
        assert not _ray_processes(ray_tmp), _ray_processes(ray_tmp)
        assert Path(ray_tmp).exists()  # it was really used
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # a's listeners: loopback only, but for the TCPStore
    assert len(listeners) >= 5, listeners  # GCS, raylet, agents, workers were seen
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    others = {addr: n for addr, n in listeners.items() if addr.rsplit(":", 1)[0] not in loopback}
    assert len(others) <= 1 and set(others.values()) <= {"ray::RayTrainWorker"}, others
    # a's single worker: max_steps overrides epochs, an evaluation at the end of epoch 1, then one at
    # step 25 in epoch 2, where the linear schedule ends
    run = a / "runs" / "run-1"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "succeeded" and status["winner"]["value"] > 0.5
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [(e["epoch"], e["step"]) for e in evals] == [(1, evals[0]["step"]), (2, 25)], evals
    assert 0 < evals[0]["step"] < 25
    assert evals[-1]["lr"] == 0.0  # the linear schedule ends at max_steps, not at the end of an epoch
    assert "reached train.max_steps (25" in status["stop_reason"]
