"""Launcher overhead: `launch` (Ray Train + DeepSpeed, 2 workers) at ZeRO 0/2/3 vs a plain loop.

Same model (the quickstart's MiniLM + projection head), same data, same effective batch (2 workers ×
16 = 32 samples per optimizer step vs one process × 32) and the same 2 cores (each worker 1 thread vs
one process with 2 threads). The figure is the median optimizer-step time, evaluation excluded.

    .venv/bin/python benchmarks/train_overhead.py [--stages 0 2 3] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "quickstart_ner.yaml"


def plain_loop(steps: int, threads: int) -> dict:
    """A single-process PyTorch loop doing the launcher's work: same batches, AdamW, clipping."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from launcher.data import collate, length_grouped_batches, load_dataset
    from launcher.evaluate import encode
    from launcher.model import build_model, param_groups
    from launcher.recipe import load_recipe, resolve_encoder

    torch.set_num_threads(threads)
    recipe, resolved = load_recipe(RECIPE)
    ds = load_dataset(resolved["data"], recipe.model.task)
    tok = AutoTokenizer.from_pretrained(resolve_encoder(recipe.model.encoder))
    feats = encode(recipe.model.task, tok, ds.splits["train"].examples, ds.labels, recipe.data.max_length,
                   recipe.data.stride)
    batch_size = recipe.train.batch_size * recipe.scaling.workers
    batches = length_grouped_batches([len(f.input_ids) for f in feats], batch_size, recipe.train.seed, True)
    torch.manual_seed(recipe.train.seed)
    model = build_model(resolved["model"], ds.labels).train()
    opt = torch.optim.AdamW(param_groups(model, 0.01, recipe.train.lr, recipe.train.head_lr), lr=recipe.train.lr)
    times, samples = [], 0
    for i in range(steps):
        ids = batches[i % len(batches)]
        start = time.perf_counter()
        batch = collate([feats[j] for j in ids], tok.pad_token_id, model.uses_token_type_ids)
        labels = batch.pop("labels")
        logits = model(**batch)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
        samples += len(ids)
    times = times[3:]  # warm-up
    return {"step_s": statistics.median(times), "samples_per_s": batch_size / statistics.median(times)}


def launch_stage(stage: int, epochs: int, runs: Path) -> dict:
    start = time.time()
    res = subprocess.run([str(Path(sys.executable).parent / "launch"), str(RECIPE), f"deepspeed.zero_stage={stage}",
                          f"train.epochs={epochs}", "--runs", str(runs)], capture_output=True, text=True)
    wall = time.time() - start
    if res.returncode != 0:
        raise SystemExit(f"launch failed at ZeRO-{stage}:\n{res.stderr[-3000:]}")
    run = sorted(runs.glob("run-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e["train_step_s"] for e in evals]
    return {"step_s": statistics.median(steps), "samples_per_s": statistics.median(e["train_samples_per_s"] for e in evals),
            "wall_s": wall, "eval_f1": evals[-1]["eval_f1"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--plain-steps", type=int, default=25)
    args = ap.parse_args()
    rows = {"plain torch loop (1 proc × 2 threads, batch 32)": plain_loop(args.plain_steps, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            rows[f"launch ZeRO-{stage} (2 workers × 1 thread, 16 each)"] = launch_stage(stage, args.epochs, Path(tmp))
    base = next(iter(rows.values()))["step_s"]
    lines = ["| setup | median step (s) | samples/s | × plain step time | launch wall (s) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | {r['step_s'] / base:.2f} | "
                     f"{r.get('wall_s', 0):.0f} |")
    table = "\n".join(lines)
    print(table)
    from benchmarks.results import append_results

    append_results("train_overhead", " ".join(["benchmarks/train_overhead.py", *sys.argv[1:]]), table)


if __name__ == "__main__":
    main()
