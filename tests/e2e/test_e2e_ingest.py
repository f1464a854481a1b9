"""Corpora through Ray Data (launcher.data.ingest): tokenized once in Ray Data tasks, not once per worker; the
driver's memory does not grow with the corpus; a bad line past what the driver read still fails the run
with its file:line. Real launches, real Ray."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import BIN, ROOT, TOY_NER, tiny_ner_recipe

from launcher.data.parse import LAUNCH_TRAIN_BYTES, read_conll

pytestmark = pytest.mark.e2e


def test_each_example_is_tokenized_once_in_a_two_epoch_run_not_once_per_worker_or_epoch(ner_run):
    """The session run has 2 workers and 2 epochs and keeps its windows (launcher.data.stream): Ray Data's own
    statistics, summed over every pass the workers streamed, count what the tokenization tasks took in."""
    status = json.loads((ner_run / "status.json").read_text())
    data = status["data"]
    train, validation = data["train"], data["validation"]
    assert data["plan"]["cache"] and data["plan"]["exact"]
    assert train["passes"] == 1 and validation["passes"] == 1  # epoch 2 and the second evaluation: kept windows
    assert train["examples"] == len(read_conll(str(TOY_NER / "train.conll")))  # not 2× (per worker or per epoch)
    assert validation["examples"] == len(read_conll(str(TOY_NER / "validation.conll")))
    assert train["windows"] == data["plan"]["train_windows"]  # the plan's count is what the stream made
    assert train["windows"] >= train["examples"] and validation["windows"] >= validation["examples"]
    metrics = [json.loads(line) for line in (ner_run / "metrics.jsonl").read_text().splitlines()]
    assert not [m for m in metrics if m["kind"] == "total"]  # an exact plan needs no correction


def _launch_peak_rss(recipe: Path, ray_tmp: str, **env: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run `launch` and sample its own process's resident memory (not Ray's processes) every 50 ms."""
    proc = subprocess.Popen(
        [str(BIN / "launch"), str(recipe)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ZEROSHIP_RAY_TMPDIR": ray_tmp, "COLUMNS": "400", **env},
    )
    peak = [0]

    def sample():
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], watched.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate(timeout=900)
    watcher.join()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), peak[0]


def test_driver_memory_stays_flat_on_a_64x_corpus_and_a_late_bad_line_still_fails(tmp_path, ray_tmp):
    """Two launches: the toy split (1×) for two steps, then 64 copies of it with a malformed line near the
    end for a whole epoch. The 64× launch both plans from a sample (no pass over the corpus first) with its
    driver's memory flat, and fails on the bad line the workers' stream reaches far past that sample."""
    toy = (TOY_NER / "train.conll").read_text()
    big = tmp_path / "train64.conll"
    lines = (toy * 64).splitlines(keepends=True)  # 38,400 sentences, each copy at its own lines
    bad_at = len(lines) - 3
    lines[bad_at] = "token-without-a-tag\n"
    big.write_text("".join(lines))
    assert big.stat().st_size > 2 * LAUNCH_TRAIN_BYTES  # the driver plans from a sample of it
    sections = dict(model={"num_hidden_layers": 1}, scaling={"workers": 1}, deepspeed={"zero_stage": 0})
    runs = {
        # two steps suffice to measure the driver's start and stream
        "1x": (TOY_NER / "train.conll", {"max_steps": 2, "eval_every": 2}),
        # a whole epoch, so the stream must reach the bad line; Ray Data parses ahead of the steps, so the run
        # stops before its first. Ranges of 1 MB: the bad line sits in the file's last range, parsed by a task
        # of its own (launcher.data.ranges), which must still name its line in the whole file
        "64x": (big, {"epochs": 1, "batch_size": 256, "eval_every": 10**6}),
    }
    peaks, results = {}, {}
    for name, (train, schedule) in runs.items():
        folder = tmp_path / name
        folder.mkdir()
        recipe = tiny_ner_recipe(folder, data={"train": str(train)}, train=schedule, **sections)
        results[name], peaks[name] = _launch_peak_rss(recipe, ray_tmp, ZEROSHIP_RANGE_BYTES=str(2**20))
        status = json.loads(next((folder / "runs").glob("run-*/status.json")).read_text())
        plan = status["data"]["plan"]  # no pass over the corpus first: the 64× count is the plan's estimate
        assert plan["exact"] == (name == "1x")
        assert abs(plan["train_windows"] - 600 * (64 if name == "64x" else 1)) <= 0.05 * plan["train_windows"]
    print(f"driver peak RSS: 1x {peaks['1x'] / 2**20:.0f} MB, 64x {peaks['64x'] / 2**20:.0f} MB")
    # The old driver parsed the whole split and pickled it into every worker's config (+1.5 GB at 16×
    # CoNLL); now it reads at most LAUNCH_TRAIN_BYTES of it. Stated bound: 64× within 64 MB of 1×.
    assert peaks["64x"] - peaks["1x"] < 64 * 2**20, peaks
    assert results["1x"].returncode == 0, (results["1x"].stdout + results["1x"].stderr)[-3000:]

    res = results["64x"]
    assert res.returncode == 2  # a user error
    assert f"{big}:{bad_at + 1}" in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    assert "Traceback" not in res.stderr
    status = json.loads(next((tmp_path / "64x" / "runs").glob("run-*/status.json")).read_text())
    assert status["state"] == "failed" and f"{big.name}:{bad_at + 1}" in status["error"]
    assert not list((tmp_path / "64x" / "runs").glob("run-*/best"))
