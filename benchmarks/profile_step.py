"""Where a training step's time goes: torch.profiler over the same optimizer steps of the plain
PyTorch loop and of the launcher's own step (`launcher.worker.engine.train_step` on the DeepSpeed engine
`launch` builds, at a ZeRO stage), in one process with the same threads, model, batches and AdamW
groups. Prints each side's top operators by self CPU time and the operators whose per-step time
differs most, and appends them to RESULTS.md.

Ray is not in the picture: this isolates what DeepSpeed and the launcher's step add. What Ray's
worker processes add (thread settings, the progress board) is the difference between this table's
zeroship row and `benchmarks/train_overhead.py`'s launch row.

    .venv/bin/python benchmarks/profile_step.py [--stage 0] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.train_overhead import batches_for, plain_step, setup, worker_step  # noqa: E402


def profiled(step, n_warmup: int, n_steps: int):
    """Run `step(i)` n_warmup times unprofiled, then n_steps times under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(n_warmup):
        step(i)
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n_warmup, n_warmup + n_steps):
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
    per_op = {e.key: e.self_cpu_time_total / 1e3 / n_steps for e in prof.key_averages()}  # ms per step
    return statistics.median(times), per_op


def plain(steps: int, warmup: int, threads: int, batch_size: int | None = None):
    recipe, _, tok, feats, model, opt = setup(threads)
    order = batches_for(recipe, feats, batch_size or recipe.train.batch_size, warmup + steps)
    return profiled(lambda i: plain_step(model, opt, tok, feats, order[i]), warmup, steps)


def zeroship(stage: int, steps: int, warmup: int, threads: int, keep_allreduce: bool = False,
             batch_size: int | None = None):
    """The worker's step: train_step on the engine built from the recipe's DeepSpeed config."""
    return profiled(worker_step(stage, threads, warmup + steps, batch_size, keep_allreduce), warmup, steps)


def table(plain_ops: dict, ours: dict, top: int) -> list[str]:
    names = set(plain_ops) | set(ours)
    diffs = sorted(names, key=lambda n: -abs(ours.get(n, 0) - plain_ops.get(n, 0)))[:top]
    lines = ["| operator (self CPU) | plain ms/step | zeroship ms/step | difference |", "|---|---|---|---|"]
    lines += [
        f"| `{n}` | {plain_ops.get(n, 0):.2f} | {ours.get(n, 0):.2f} | {ours.get(n, 0) - plain_ops.get(n, 0):+.2f} |"
        for n in diffs
    ]
    return lines


def side(args, which: str) -> tuple[float, dict]:
    """Each side in a fresh process: the second side of one process ran every operator ~25% slower
    (measured, whichever it was), which would read as overhead."""
    cmd = [
        sys.executable,
        __file__,
        "--side",
        which,
        "--stage",
        str(args.stage),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
    ] + (["--keep-allreduce"] * args.keep_allreduce)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the {which} side failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["step_s"], out["ops"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=0, choices=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16, help="samples per step (the quickstart's per-worker batch)")
    ap.add_argument("--keep-allreduce", action="store_true",
                    help="profile the step as it was before skip_single_rank_allreduce (the 'before' row)")
    ap.add_argument("--side", choices=["plain", "zeroship"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        fn = (lambda: plain(args.steps, args.warmup, args.threads, args.batch)) if args.side == "plain" else (
            lambda: zeroship(args.stage, args.steps, args.warmup, args.threads, args.keep_allreduce, args.batch))
        step_s, ops = fn()
        print(json.dumps({"step_s": step_s, "ops": ops}))
        return
    plain_s, plain_ops = side(args, "plain")
    ours_s, ours = side(args, "zeroship")
    lines = [
        f"Median step under the profiler (batch {args.batch}, 1 process × {args.threads} threads, each side in its own "
        f"process): plain loop {plain_s:.3f} s, zeroship ZeRO-{args.stage} step"
        f"{' (DeepSpeed all-reduce kept)' if args.keep_allreduce else ''} {ours_s:.3f} s "
        f"({ours_s / plain_s:.2f}×). Profiled totals per step: plain {sum(plain_ops.values()):.1f} ms, "
        f"zeroship {sum(ours.values()):.1f} ms.",
        "",
        *table(plain_ops, ours, args.top),
    ]
    print("\n".join(lines))
    from benchmarks.results import append_results

    append_results(f"profile_step (ZeRO-{args.stage})", " ".join(["benchmarks/profile_step.py", *sys.argv[1:]]),
                   "\n".join(lines))


if __name__ == "__main__":
    main()
