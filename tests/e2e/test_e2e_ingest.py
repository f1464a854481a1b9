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


def test_each_example_is_tokenized_once_not_once_per_worker(ner_run):
    """The session run has 2 workers; Ray Data's own statistics count what the tokenization tasks took in."""
    status = json.loads((ner_run / "status.json").read_text())
    train, validation = status["data"]["train"], status["data"]["validation"]
    assert train["examples"] == len(read_conll(str(TOY_NER / "train.conll")))  # not 2× (one pass per worker)
    assert validation["examples"] == len(read_conll(str(TOY_NER / "validation.conll")))
    assert train["windows"] >= train["examples"] and validation["windows"] >= validation["examples"]


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
    toy = (TOY_NER / "train.conll").read_text()
    big = tmp_path / "train64.conll"
    big.write_text(toy * 64)  # 38,400 sentences, each copy at its own lines
    assert big.stat().st_size > 2 * LAUNCH_TRAIN_BYTES  # the driver plans from a sample of it
    sections = dict(model={"num_hidden_layers": 1}, train={"max_steps": 2, "eval_every": 2},
                    scaling={"workers": 1}, deepspeed={"zero_stage": 0})
    peaks = {}
    for name, train in (("1x", TOY_NER / "train.conll"), ("64x", big)):
        folder = tmp_path / name
        folder.mkdir()
        recipe = tiny_ner_recipe(folder, data={"train": str(train)}, **sections)
        res, peaks[name] = _launch_peak_rss(recipe, ray_tmp)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        status = json.loads(next((folder / "runs").glob("run-*/status.json")).read_text())
        assert status["data"]["train"]["examples"] == 600 * (64 if name == "64x" else 1)
    print(f"driver peak RSS: 1x {peaks['1x'] / 2**20:.0f} MB, 64x {peaks['64x'] / 2**20:.0f} MB")
    # The old driver parsed the whole split and pickled it into every worker's config (+1.5 GB at 16×
    # CoNLL); now it reads at most LAUNCH_TRAIN_BYTES of it. Stated bound: 64× within 64 MB of 1×.
    assert peaks["64x"] - peaks["1x"] < 64 * 2**20, peaks

    # a malformed line near the end, far past the driver's sample: Ray Data's check pass finds it
    lines = big.read_text().splitlines(keepends=True)
    bad_at = len(lines) - 3
    lines[bad_at] = "token-without-a-tag\n"
    big.write_text("".join(lines))
    folder = tmp_path / "bad"
    folder.mkdir()
    # ranges of 1 MB: the bad line sits in the file's last range, parsed by a task of its own
    # (launcher.data.ranges), which must still name its line in the whole file
    res, _ = _launch_peak_rss(tiny_ner_recipe(folder, data={"train": str(big)}, **sections), ray_tmp,
                              ZEROSHIP_RANGE_BYTES=str(2**20))
    assert res.returncode != 0
    assert f"{big}:{bad_at + 1}" in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    assert "Traceback" not in res.stderr
    status = json.loads(next((folder / "runs").glob("run-*/status.json")).read_text())
    assert status["state"] == "failed" and f"{big.name}:{bad_at + 1}" in status["error"]
    assert not list((folder / "runs").glob("run-*/best"))
