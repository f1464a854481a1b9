"""CoNLL-2003 accuracy: the baseline (projection head and regularizers off) and the tuned recipe
(`recipes/conll2003_minilm.yaml`), side by side, same data, epochs, lr, batch and seed, packaged
MiniLM. Prints test entity F1 (seqeval, micro) and wall time of each, and appends them to RESULTS.md.

    .venv/bin/python benchmarks/accuracy.py [--epochs N]      # two full runs (tuned recipe: 3 epochs, ~43 min, 2 cores)
    .venv/bin/python benchmarks/accuracy.py --select           # how the recipe's settings were chosen

`--select` trains each candidate setting for 1 epoch on the first 3,000 training sentences and ranks
them by **validation** F1 (the test split is never looked at to choose); the recipe carries the winner.
The data is fetched at run time (benchmarks/conll.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "conll2003_minilm.yaml"

# Everything the tuned recipe may switch on, switched off (gradient clipping included).
BASELINE = ["model.head.layers=0", "regularization.weight_decay=0", "regularization.label_smoothing=0",
            "regularization.max_grad_norm=0", "regularization.l2_sp=0", "regularization.l2_head=0",
            "regularization.r_drop=0", "regularization.fgm_epsilon=0", "train.layer_decay=1",
            "data.augmentation.mention_replacement=0", "data.augmentation.o_deletion=0",
            "data.augmentation.o_replacement=0", "data.augmentation.case=0", "model.casing=false"]
# Candidates for --select, each on top of the baseline. R-Drop and FGM double the step cost and were
# left out of the selection on 2 CPU cores. `--only NAME…` runs some of them.
CANDIDATES = {
    "baseline": [],
    "head": ["model.head.layers=1", "regularization.weight_decay=0.01", "regularization.max_grad_norm=1"],
    "head + label smoothing 0.1": ["model.head.layers=1", "regularization.weight_decay=0.01",
                                   "regularization.max_grad_norm=1", "regularization.label_smoothing=0.1"],
    "head + layer decay 0.8": ["model.head.layers=1", "regularization.weight_decay=0.01",
                               "regularization.max_grad_norm=1", "train.layer_decay=0.8"],
    "head + mention replacement 0.3": ["model.head.layers=1", "regularization.weight_decay=0.01",
                                       "regularization.max_grad_norm=1",
                                       "data.augmentation.mention_replacement=0.3"],
    # MiniLM's tokenizer lowercases: the casing classes as token types (zeroship.casing)
    "head + mention replacement 0.3 + casing": ["model.head.layers=1", "regularization.weight_decay=0.01",
                                                "regularization.max_grad_norm=1",
                                                "data.augmentation.mention_replacement=0.3", "model.casing=true"],
}


def launch(overrides: list[str], runs: Path, recipe: Path = RECIPE) -> dict:
    """Train `recipe` with the overrides; F1 of the merged fp32 best/ (validation, test), the value
    the workers reported for the winner, its last evaluation's throughput, and the wall time."""
    start = time.time()
    res = subprocess.run([str(Path(sys.executable).parent / "launch"), str(recipe), *overrides, "--runs", str(runs)],
                         capture_output=True, text=True)
    wall = time.time() - start
    if res.returncode != 0:
        raise SystemExit(f"launch failed ({' '.join(overrides)}):\n{res.stderr[-3000:]}")
    run = sorted(runs.glob("run-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    metrics = json.loads((run / "best" / "metrics.json").read_text())
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    return {"validation": metrics["validation"]["eval_f1"], "test": metrics.get("test", {}).get("eval_f1"),
            "reported": metrics["reported"]["value"], "eval_loss": metrics["validation"]["eval_loss"],
            "samples_per_s": evals[-1].get("train_samples_per_s", 0.0), "wall_s": wall, "run": str(run)}


def subset(n: int) -> Path:
    """The first n training sentences (a cheap stand-in for choosing settings)."""
    from benchmarks.conll import fetch

    src = fetch() / "train.txt"
    out = src.with_name(f"train_first{n}.txt")
    if not out.is_file():
        blocks = [b for b in src.read_text().split("\n\n") if b.strip() and not b.startswith("-DOCSTART-")]
        out.write_text("\n\n".join(blocks[:n]) + "\n")
    return out


def main() -> None:
    from benchmarks.conll import fetch
    from benchmarks.results import append_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--select", action="store_true", help="rank candidate settings by validation F1")
    ap.add_argument("--epochs", type=int, help="epochs for both runs (default: the recipe's)")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=list(CANDIDATES),
                    help="with --select: only these candidates")
    ap.add_argument("--keep", metavar="DIR", help="keep the runs here (default: a temp folder)")
    args = ap.parse_args()
    fetch()
    command = " ".join(["benchmarks/accuracy.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.keep or tmp)
        if args.select:
            train = subset(3000)
            rows = {name: launch([*BASELINE, *extra, f"data.train={train}", "train.epochs=1"], runs)
                    for name, extra in CANDIDATES.items() if not args.only or name in args.only}
            lines = ["| candidate (1 epoch, first 3,000 train sentences) | validation entity F1 | wall (s) |",
                     "|---|---|---|"]
            best = max(rows, key=lambda n: rows[n]["validation"])
            lines += [f"| {'**' + n + '**' if n == best else n} | {r['validation']:.4f} | {r['wall_s']:.0f} |"
                      for n, r in rows.items()]
            table = "\n".join(lines)
            print(table)
            append_results("accuracy: choosing the CoNLL-2003 settings on validation", command, table)
            return
        epochs = [f"train.epochs={args.epochs}"] if args.epochs else []
        rows = {"baseline (no projection head, no regularization)": launch([*BASELINE, *epochs], runs),
                "tuned (recipes/conll2003_minilm.yaml)": launch(epochs, runs)}
    lines = ["| recipe | test entity F1 | validation entity F1 | wall (s) |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['test']:.4f} | {r['validation']:.4f} | {r['wall_s']:.0f} |" for n, r in rows.items()]
    table = "\n".join(lines)
    print(table)
    append_results("accuracy: CoNLL-2003 test, baseline vs tuned", command, table)


if __name__ == "__main__":
    main()
