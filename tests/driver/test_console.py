"""What `launch` prints: by default the plan, progress, evaluations, results and real errors, and nothing
from Ray, the workers or the libraries (those go to runs/run-N/logs/); and two launches at once on one
machine, each with its own private Ray, both succeed and leave nothing running."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, tiny_ner_recipe

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


def test_two_launches_at_once_each_use_only_their_own_ray(tmp_path):
    procs = []
    for name in ("a", "b"):  # b runs with -v: its workers' output streams to its console
        folder = tmp_path / name
        folder.mkdir()
        recipe = tiny_ner_recipe(folder, scaling={"workers": 1}, deepspeed={"zero_stage": 0},
                                 model={"num_hidden_layers": 1}, train={"max_steps": 8})  # not about training
        ray_tmp = f"/tmp/zs-{name}{os.getpid()}"
        env = {**os.environ, "ZEROSHIP_RAY_TMPDIR": ray_tmp}
        args = [str(BIN / "launch"), str(recipe)] + (["-v"] if name == "b" else [])
        procs.append((folder, ray_tmp, subprocess.Popen(args, cwd=ROOT, env=env,
                                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
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
