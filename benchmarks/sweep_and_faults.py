"""Sweep parallelism and recovery time, on the tiny test recipe (2-layer MiniLM, toy NER data).

1. A 2×2 grid of 1-worker trials run as the cluster allows (2 at a time on 2 cores) vs the same
   grid with sweep.max_concurrent=1 (one after another): wall time of each.
2. A 2-worker run whose rank 1 dies at step 13 (run.max_failures=1): seconds from the worker's death
   to training resumed (the restarted workers have loaded the checkpoint).

    .venv/bin/python benchmarks/sweep_and_faults.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import tiny_ner_recipe  # noqa: E402  (the recipe the tests use)

LAUNCH = str(Path(sys.executable).parent / "launch")
GRID = {"method": "grid", "parameters": {"train.lr": [5e-5, 3e-4], "model.head.dim": [32, 64]}}


def timed_launch(recipe: Path, env: dict | None = None) -> float:
    import os

    start = time.time()
    res = subprocess.run([LAUNCH, str(recipe)], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return time.time() - start


def main() -> None:
    rows = []
    for label, concurrent in (("parallel (as the cluster allows: 2)", None), ("sequential (max_concurrent 1)", 1)):
        with tempfile.TemporaryDirectory() as tmp:
            sweep = dict(GRID, **({"max_concurrent": concurrent} if concurrent else {}))
            recipe = tiny_ner_recipe(Path(tmp), scaling={"workers": 1}, train={"epochs": 1}, sweep=sweep)
            rows.append(f"| 2×2 grid sweep, {label} | {timed_launch(recipe):.0f} s |")
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "died"
        recipe = tiny_ner_recipe(Path(tmp), train={"epochs": 2, "eval_every": 5}, run={"max_failures": 1})
        timed_launch(recipe, {"ZEROSHIP_FAULT": f"1:13:{marker}"})
        died = float(marker.read_text())
        lines = [json.loads(x) for x in (Path(tmp) / "runs/run-1/metrics.jsonl").read_text().splitlines()]
        resumed = next(x for x in lines if x["kind"] == "resume")
        rows.append(f"| worker killed at step 13 → training resumed from step {resumed['step']} | "
                    f"{resumed['time'] - died:.1f} s |")
    table = "\n".join(["| measurement | value |", "|---|---|", *rows])
    print(table)
    from benchmarks.results import append_results

    append_results("sweep_and_faults", "benchmarks/sweep_and_faults.py", table)


if __name__ == "__main__":
    main()
