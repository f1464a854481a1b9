"""bf16 vs fp32 training, same recipe, data, seed and workers: the validation entity F1 the workers
reported (computed by the model in its training precision), the F1 of the fp32 `best/` the driver
merged (the masters), the validation loss, training throughput and wall time. Appends to RESULTS.md.

    .venv/bin/python benchmarks/precision.py                 # the quickstart recipe (~2 × 2-3 min on 2 cores)
    .venv/bin/python benchmarks/precision.py --conll 3000    # CoNLL-2003 recipe, first 3,000 sentences, 1 epoch

On CPU workers bf16 runs through DeepSpeed's CPU accelerator; its speed depends on the CPU having
AMX / avx512_bf16 (the machine line in RESULTS.md names the CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import RECIPE as CONLL_RECIPE  # noqa: E402
from benchmarks.accuracy import launch, subset  # noqa: E402

QUICKSTART = ROOT / "recipes" / "quickstart_ner.yaml"


def main() -> None:
    from benchmarks.results import append_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--conll", type=int, metavar="N", help="CoNLL-2003 recipe on its first N training sentences, 1 epoch"
    )
    args = ap.parse_args()
    if args.conll:
        from benchmarks.conll import fetch

        fetch()
        recipe, extra = CONLL_RECIPE, [f"data.train={subset(args.conll)}", "train.epochs=1"]
        what = f"CoNLL-2003 recipe, first {args.conll} train sentences, 1 epoch"
    else:
        recipe, extra, what = QUICKSTART, [], "quickstart recipe"
    with tempfile.TemporaryDirectory() as runs:
        rows = {p: launch([*extra, f"deepspeed.precision={p}"], Path(runs), recipe) for p in ("fp32", "bf16")}
    lines = [f"| precision ({what}) | reported validation F1 (workers) | fp32 best/ validation F1 | "
             "validation loss | train samples/s | wall (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {p} | {r['reported']:.4f} | {r['validation']:.4f} | {r['eval_loss']:.4f} | "
              f"{r['samples_per_s']:.1f} | {r['wall_s']:.0f} |" for p, r in rows.items()]
    table = "\n".join(lines)
    print(table)
    append_results(f"precision: bf16 vs fp32, {what}", " ".join(["benchmarks/precision.py", *sys.argv[1:]]), table)


if __name__ == "__main__":
    main()
