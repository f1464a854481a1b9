"""Launcher overhead: `launch` (Ray Train + DeepSpeed, 1 and 2 workers) at ZeRO 0/2/3 vs a plain
PyTorch loop, the transformers `Trainer`, and the `Trainer` through DeepSpeed at the same stages and
with the same DeepSpeed config (ZeRO's own cost, apart from the launcher's), and the workers' own step
alone in one process (the launcher's step without Ray around it). A second table breaks each launch's
start-up down by phase (metrics.jsonl's `startup` record).

Same model (the quickstart's MiniLM + projection head), same data, same optimizer (the workers' fused
AdamW over the same parameter groups), same effective batch (32 samples per optimizer step: 1 worker ×
32 or 2 workers × 16) and the same 2 cores (1 worker × 2 threads, 2 workers × 1 thread, one process × 2
threads). The figure is the median optimizer-step time in steady state, evaluation and checkpointing
excluded: the baselines drop their first 3 steps, the launches their first epoch. Every baseline row
runs in a fresh process. With `--rounds N` every row runs N times, interleaved, and each ratio is taken
within a round, then its median over the rounds (with the lowest and highest): the step time of one
process on a shared 2-core machine drifts by ±15% over minutes.

    (transformers' Trainer needs accelerate, which comes with peft)
    .venv/bin/python benchmarks/train_overhead.py [--stages 0 2 3] [--workers 1 2] [--epochs 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "quickstart_ner.yaml"


def setup(threads: int):
    """What both baselines share: the quickstart recipe's features, model and AdamW groups."""
    import torch
    from transformers import AutoTokenizer

    from launcher.data.features import encode
    from launcher.data.parse import load_dataset
    from launcher.nn.model import build_model, param_groups
    from launcher.recipe.schema import load_recipe, resolve_encoder
    from launcher.worker.engine import adamw

    torch.set_num_threads(threads)
    recipe = load_recipe(RECIPE)
    resolved = recipe.as_dict()
    ds = load_dataset(resolved["data"], recipe.model.task)
    tok = AutoTokenizer.from_pretrained(resolve_encoder(recipe.model.encoder))
    feats = encode(recipe.model.task, tok, ds.splits["train"].examples, ds.labels, recipe.data.max_length,
                   recipe.data.stride)
    torch.manual_seed(recipe.train.seed)
    model = build_model(resolved["model"], ds.labels).train()
    opt = adamw(param_groups(model, 0.01, recipe.train.lr, recipe.train.head_lr), recipe.train.lr)  # as the workers do
    return recipe, resolved, tok, feats, model, opt


def plain_step(model, opt, tok, feats, ids: list[int]) -> None:
    """One step of a plain PyTorch loop doing the launcher's work: same batch, loss, AdamW, clipping."""
    import torch
    import torch.nn.functional as F

    from launcher.data.features import collate

    batch = collate([feats[j] for j in ids], tok.pad_token_id, model.uses_token_type_ids)
    labels = batch.pop("labels")
    logits = model(**batch)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def plain_loop(steps: int, threads: int) -> dict:
    """A single-process PyTorch loop over the launcher's length-grouped batches."""
    from launcher.data.features import length_grouped_batches

    recipe, _, tok, feats, model, opt = setup(threads)
    batch_size = recipe.train.batch_size * recipe.scaling.workers
    batches = length_grouped_batches([len(f.input_ids) for f in feats], batch_size, recipe.train.seed, True)
    return timed(lambda i: plain_step(model, opt, tok, feats, batches[i % len(batches)]), steps, batch_size)


def timed(step, steps: int, batch_size: int) -> dict:
    """Median time of step(i) for i < steps, the first 3 (warm-up) left out."""
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    median = statistics.median(times[3:])
    return {"step_s": median, "samples_per_s": batch_size / median}


def hf_trainer(steps: int, threads: int, gpu: bool = False, zero_stage: int | None = None) -> dict:
    """transformers' Trainer on the same model, features, optimizer groups, batch 32 and threads;
    with `zero_stage`, through DeepSpeed with the config `launch` builds for the same recipe and stage
    (on GPU in bf16; on CPU in fp32 over gloo, one process) — the fair anchor for ZeRO's own cost."""
    import torch
    import torch.nn.functional as F
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from launcher.data.features import collate

    recipe, resolved, tok, feats, model, opt = setup(threads)

    def loss_fn(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1), ignore_index=-100)

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)

    batch_size = recipe.train.batch_size * recipe.scaling.workers
    extra: dict = {}
    if gpu or zero_stage is not None:
        import os

        from launcher.recipe.ds_config import build_ds_config
        from launcher.worker.engine import skip_shm_comm_build

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
        skip_shm_comm_build()  # as the workers do
        resolved["deepspeed"].update(zero_stage=zero_stage or 0, precision="bf16" if gpu else "fp32")
        resolved["train"]["batch_size"] = batch_size
        from launcher.nn.model import trainable_params

        extra = {"bf16": gpu, "deepspeed": build_ds_config(resolved, world_size=1, trainable=trainable_params(model))}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            use_cpu=not gpu,
            **extra,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            max_grad_norm=1.0,
            train_sampling_strategy="group_by_length",
            dataloader_num_workers=0,
            seed=recipe.train.seed,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        class SameOptimizer(Trainer):
            # transformers' DeepSpeed path drops an optimizer passed as `optimizers=` and builds its own
            # (2 groups, lr 5e-5); overriding create_optimizer is its documented way to keep ours
            def create_optimizer(self, model=None):
                self.optimizer = opt
                return opt

        timer = StepTimer()
        trainer = SameOptimizer(
            model=model,
            args=args,
            train_dataset=[{"input_ids": f.input_ids, "f": f} for f in feats],
            data_collator=lambda rows: collate([r["f"] for r in rows], tok.pad_token_id, model.uses_token_type_ids),
            optimizers=(opt, None),
            compute_loss_func=loss_fn,
            callbacks=[timer],
        )
        trainer.train()
    times = timer.times[3:]  # warm-up
    peak = {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if gpu else {}
    return {"step_s": statistics.median(times), "samples_per_s": batch_size / statistics.median(times), **peak}


def free_port() -> str:
    """A loopback port for a child's MASTER_PORT (the gloo store of its one-rank process group)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def fresh_process(kind: str, stage: int, steps: int, threads: int) -> dict:
    """One baseline row (`kind`: plain, trainer, trainer-ds, step-alone) in a fresh process of this script,
    with a free MASTER_PORT. Fresh, because a process's history changes what it measures: after the
    Trainer's ZeRO-3 run transformers keeps building models partitioned (its global DeepSpeed config), and
    the second of two loops in one process ran every operator ~25% slower (benchmarks/profile_step.py)."""
    import os

    res = subprocess.run([sys.executable, __file__, "--row", kind, "--row-stage", str(stage), "--plain-steps",
                          str(steps), "--threads", str(threads)], capture_output=True, text=True,
                         env={**os.environ, "MASTER_PORT": free_port()})
    if res.returncode != 0:
        raise SystemExit(f"the {kind} row failed at ZeRO-{stage}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def row_here(kind: str, stage: int, steps: int, threads: int) -> dict:
    """fresh_process's side: the row's figure, the median of `steps` steps at batch 32."""
    if kind == "plain":
        return plain_loop(steps, threads)
    if kind == "trainer":
        return hf_trainer(steps, threads)
    if kind == "trainer-ds":
        return hf_trainer(steps, threads, zero_stage=stage)
    return timed(worker_step(stage, threads, steps, batch_size=32), steps, 32)


def launch_stage(stage: int, workers: int, epochs: int, runs: Path, gpu: bool = False) -> dict:
    start = time.time()
    total_batch = 32
    where = (["scaling.use_gpu=true", "scaling.gpus_per_worker=1", "deepspeed.precision=bf16"] if gpu
             else [f"scaling.cpus_per_worker={2 // workers}"])
    res = subprocess.run([str(Path(sys.executable).parent / "launch"), str(RECIPE), f"deepspeed.zero_stage={stage}",
                          f"train.epochs={epochs}", f"scaling.workers={workers}", *where,
                          f"train.batch_size={total_batch // workers}", "--runs", str(runs)],
                         capture_output=True, text=True)
    wall = time.time() - start
    if res.returncode != 0:
        raise SystemExit(f"launch failed at ZeRO-{stage}:\n{res.stderr[-3000:]}")
    run = sorted(runs.glob("run-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    # steady state, as the baselines' figures are (they drop their first 3 steps): the epochs after the
    # first, whose median still carries the first steps' warm-up on a ~19-step epoch
    steady = evals[1:] or evals
    peak = {"peak_gpu_mb": max(e["train_peak_gpu_mb"] for e in evals)} if gpu else {}
    startup = next(r for r in records if r["kind"] == "startup")
    return {"step_s": statistics.median(e["train_step_s"] for e in steady),
            "samples_per_s": statistics.median(e["train_samples_per_s"] for e in steady),
            "wall_s": wall, "eval_f1": evals[-1]["eval_f1"], "startup": startup, **peak}


def startup_table(rows: dict) -> str:
    """Where each launch's time before its first optimizer step went (metrics.jsonl's first record)."""
    from launcher.driver.startup import PHASES

    names = [name for name, _, _ in PHASES]
    lines = ["| launch | to first step (s) | " + " | ".join(n.replace("_", " ") for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for name, r in rows.items():
        if "startup" in r:
            sec = r["startup"]["seconds"]
            lines.append(f"| {name} | {r['startup']['to_first_step_s']:.1f} | "
                         + " | ".join(f"{sec.get(n, 0):.1f}" for n in names) + " |")
    return "\n".join(lines)


def gpu_rows(stages: list[int], epochs: int, steps: int) -> dict:
    """One GPU, bf16, NCCL: `launch` (1 worker) vs the Trainer with the same DeepSpeed config, per stage."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            rows[f"launch ZeRO-{stage} (1 GPU, bf16, batch 32)"] = launch_stage(stage, 1, epochs, Path(tmp), gpu=True)
            rows[f"Trainer + DeepSpeed ZeRO-{stage} (1 GPU, bf16, batch 32)"] = hf_trainer(steps, 2, gpu=True,
                                                                                          zero_stage=stage)
    return rows


def trainer_ds_anchor(rows: dict, name: str) -> float | None:
    """A zeroship row's fair anchor (issue 18): the Trainer + DeepSpeed row at the same ZeRO stage."""
    if name.startswith("Trainer") or "ZeRO-" not in name:
        return None
    stage = name.split("ZeRO-")[1].split(" ")[0].rstrip(",")
    return next((r["step_s"] for n, r in rows.items() if n.startswith(f"Trainer + DeepSpeed ZeRO-{stage} ")), None)


ROW_KINDS = ["plain", "trainer", "trainer-ds", "step-alone"]


def one_round(args) -> dict:
    """Every row once, each baseline in its own process, then the launches."""
    rows = {"plain torch loop (1 proc × 2 threads, batch 32)": fresh_process("plain", 0, args.plain_steps, 2)}
    try:
        import accelerate  # noqa: F401  (the Trainer needs it; it comes with peft)

        rows["transformers Trainer (1 proc × 2 threads, batch 32)"] = fresh_process("trainer", 0, args.plain_steps, 2)
        for stage in args.stages:
            rows[f"Trainer + DeepSpeed ZeRO-{stage} (1 proc × 2 threads, batch 32)"] = fresh_process(
                "trainer-ds", stage, args.plain_steps, 2)
    except ImportError as exc:
        print(f"skipping the Trainer rows ({exc}); accelerate comes with peft (make install)")
    for stage in args.stages:
        rows[f"zeroship step alone, ZeRO-{stage} (1 proc × 2 threads, batch 32, no Ray)"] = fresh_process(
            "step-alone", stage, args.plain_steps, 2)
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            for stage in args.stages:
                shape = "1 worker × 2 threads, 32" if workers == 1 else "2 workers × 1 thread, 16 each"
                rows[f"launch ZeRO-{stage} ({shape})"] = launch_stage(stage, workers, args.epochs, Path(tmp))
    return rows


def overhead_table(rounds: list[dict]) -> str:
    """Each row's median step over the rounds and its ratios, each ratio taken within a round (so the
    machine's drift between rounds cancels) and then the median over rounds; with more than one round,
    the spread (lowest–highest) of the ratios too."""
    def ratio(values: list[float]) -> str:
        if not values:
            return ""
        spread = f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else ""
        return f"{statistics.median(values):.2f}{spread}"

    plain = next(iter(rounds[0]))
    each = len(rounds) > 1
    lines = [
        "| setup | median step (s) | samples/s | × plain step time | × Trainer + DeepSpeed, same stage "
        "| launch wall (s) |"
        + (" step in each round (s) |" if each else ""),
        "|---|---|---|---|---|---|" + ("---|" if each else ""),
    ]
    for name in rounds[0]:
        step = statistics.median(rows[name]["step_s"] for rows in rounds)
        samples = statistics.median(rows[name]["samples_per_s"] for rows in rounds)
        versus_plain = [rows[name]["step_s"] / rows[plain]["step_s"] for rows in rounds] if name != plain else [1.0]
        versus_ds = [rows[name]["step_s"] / anchor for rows in rounds if (anchor := trainer_ds_anchor(rows, name))]
        wall = statistics.median(rows[name].get("wall_s", 0) for rows in rounds)
        by_round = " / ".join(f"{rows[name]['step_s']:.3f}" for rows in rounds)
        lines.append(
            f"| {name} | {step:.3f} | {samples:.1f} | {ratio(versus_plain)} | {ratio(versus_ds)} | {wall:.0f} |"
            + (f" {by_round} |" if each else "")
        )
    if each:
        lines += ["", f"{len(rounds)} rounds, each running every row once in the order above; the ratios are the "
                      "median of each round's ratio (lowest–highest in brackets)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument(
        "--epochs", type=int, default=2, help="launch epochs; the figure is from the epochs after the first"
    )
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--plain-steps", type=int, default=25)
    ap.add_argument("--gpu", action="store_true", help="one GPU, bf16: launch vs Trainer+DeepSpeed per stage")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every row this many times, interleaved; report medians and the spread")
    ap.add_argument("--row", choices=ROW_KINDS, help=argparse.SUPPRESS)  # fresh_process's own process
    ap.add_argument("--row-stage", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.row:
        print(json.dumps(row_here(args.row, args.row_stage, args.plain_steps, args.threads)))
        return
    if args.gpu:
        rows = gpu_rows(args.stages, args.epochs, args.plain_steps)
        lines = ["| setup | median step (s) | samples/s | peak GPU MB |", "|---|---|---|---|"]
        lines += [
            f"| {n} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | {r['peak_gpu_mb']:.0f} |" for n, r in rows.items()
        ]
        lines += ["", "Start-up, from the `launch` process start to the first optimizer step:", "", startup_table(rows)]
        print("\n".join(lines))
        from benchmarks.results import append_results

        append_results(
            "train_overhead (GPU)", " ".join(["benchmarks/train_overhead.py", *sys.argv[1:]]), "\n".join(lines)
        )
        return
    rounds = [one_round(args) for _ in range(args.rounds)]
    table = overhead_table(rounds) + (
        "\n\nStart-up, from the `launch` process start to the first optimizer step"
        + (" (each round's launches)" if len(rounds) > 1 else "") + ":\n\n"
        + startup_table({f"{name}{f' (round {i + 1})' if len(rounds) > 1 else ''}": r
                         for i, rows in enumerate(rounds) for name, r in rows.items() if "startup" in r}))
    print(table)
    from benchmarks.results import append_results

    append_results("train_overhead", " ".join(["benchmarks/train_overhead.py", *sys.argv[1:]]), table)




def batches_for(recipe, feats, batch_size: int, steps: int) -> list[list[int]]:
    from launcher.data.features import length_grouped_batches

    batches = length_grouped_batches([len(f.input_ids) for f in feats], batch_size, recipe.train.seed, True)
    return [batches[i % len(batches)] for i in range(steps)]


def worker_step(stage: int, threads: int, steps: int, batch_size: int | None = None, keep_allreduce: bool = False):
    """The workers' step outside Ray: `train_step` on the engine built from the recipe's DeepSpeed config
    (the stage, fp32) with the workers' optimizer, over the launcher's length-grouped batches (the
    recipe's batch size unless given). Returns step(i), which runs the i-th batch."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    import torch

    from launcher.worker.engine import import_deepspeed, skip_shm_comm_build

    deepspeed = import_deepspeed()
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    from launcher.data.features import collate
    from launcher.recipe.ds_config import build_ds_config
    from launcher.worker.engine import skip_single_rank_allreduce, train_step
    from launcher.worker.regularize import TaskLoss

    recipe, resolved, tok, feats, model, opt = setup(threads)
    batch_size = batch_size or recipe.train.batch_size
    resolved["deepspeed"].update(zero_stage=stage, precision="fp32")
    resolved["train"]["batch_size"] = batch_size
    device = torch.device("cpu")  # as worker_device() gives a CPU worker (it needs Ray Train's context)
    task_loss = TaskLoss(model, resolved["regularization"], partitioned=stage == 3, device=device)
    from launcher.nn.model import trainable_params

    config = build_ds_config(resolved, 1, trainable_params(model))  # as the workers build it
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    if not keep_allreduce:
        skip_single_rank_allreduce(engine, 1, stage)  # as the worker does
    order = batches_for(recipe, feats, batch_size, steps)

    def step(i: int) -> None:
        batch = collate([feats[j] for j in order[i]], tok.pad_token_id, model.uses_token_type_ids)
        train_step(engine, task_loss, batch, device)

    return step


if __name__ == "__main__":
    main()
