"""Ingest at scale: `launch` on 1×, 16× and 64× copies of CoNLL-2003 train (generated here, never
committed) with `train.max_steps` small, so the figures are about reading, tokenizing and handing the
data to the workers, not about training. Per copy: the peak RSS of the `launch` process (the driver),
the peak RSS of each Ray Train worker and of any other Ray process (Ray Data's readers and
tokenizers), and the seconds from `launch` to the first optimizer step (metrics.jsonl's start-up
record: before issue 14 with the workers' tokenization phase; then with the `ray_data` phase, which held
the check pass of a big train split, and the workers' `data_shards` phase, which held the wait for Ray Data's
counting pass; since issue 34 neither pass exists: the schedule starts from the plan's estimate). "vs 1×" is
each row's time to the first step over the 1× row's, in the same run. `--corpus quickstart` copies the
quickstart's toy train split (57 KB) instead of CoNLL-2003's. RSS is sampled every 0.2 s with psutil.

The model is the packaged MiniLM cut to one layer (`model.num_hidden_layers=1`): the encoder's size
is not what this measures. A copy whose run would leave less than `--min-free-gb` of the machine's
memory free is stopped, and the row says so.

    .venv/bin/python benchmarks/ingest.py [--copies 1 16 64] [--workers 2] [--shards 1] [--corpus conll]
                                         [--repeat N]   # N rounds of every size, and their medians
    .venv/bin/python benchmarks/ingest.py --feed-rate [--copies 4]

`--feed-rate` measures the input pipeline alone, with no model: Ray Data reads, parses and tokenizes the
corpus (`launcher.data.ingest`, as a launch builds it) and one consumer turns the windows into padded
batches as a worker does (`launcher.data.stream`, `features.collate`); windows per second, and per CPU of
the machine (every CPU is Ray Data's here). Then a real launch of the whole MiniLM on the same windows
measures what one worker's step consumes on this machine's CPU (`train_samples_per_s`), and
`--step-rate W` adds a GPU worker's figure measured on a GPU: the data CPUs a worker needs are the one
divided by the other, the arithmetic in cluster/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.conll import fetch  # noqa: E402
from benchmarks.results import append_results  # noqa: E402

QUICKSTART = ROOT / "recipes" / "data" / "toy_ner"


def splits(corpus: str) -> tuple[Path, Path]:
    """(train, validation) of the corpus copied: CoNLL-2003 (fetched) or the quickstart's toy NER split."""
    if corpus == "quickstart":
        return QUICKSTART / "train.conll", QUICKSTART / "validation.conll"
    return fetch() / "train.txt", fetch() / "valid.txt"


def make_copies(folder: Path, copies: int, shards: int, corpus: str = "conll") -> Path:
    """`copies` × the corpus' train split: one file, or a folder of `shards` files of whole copies."""
    train = splits(corpus)[0].read_bytes()
    if shards == 1:
        path = folder / f"train_x{copies}.txt"
        with open(path, "wb") as fh:
            for _ in range(copies):
                fh.write(train + b"\n")
        return path
    out = folder / f"train_x{copies}"
    out.mkdir()
    for s in range(shards):
        n = copies // shards + (s < copies % shards)
        with open(out / f"part-{s:04d}.txt", "wb") as fh:
            for _ in range(n):
                fh.write(train + b"\n")
    return out


def recipe(folder: Path, train: Path, workers: int, corpus: str = "conll") -> Path:
    path = folder / "ingest.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "model": {"encoder": "packaged:all-MiniLM-L6-v2", "task": "token_classification", "num_hidden_layers": 1,
                  "head": {"dim": 64}},
        "data": {"format": "conll", "train": str(train), "validation": str(splits(corpus)[1]),
                 "max_length": 64, "stride": 16},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 16, "lr": 1e-4, "eval_every": "epoch",
                  "metric": "eval_f1"},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "scaling": {"workers": workers, "cpus_per_worker": 1},
        "run": {"storage": str(folder / "runs")},
    }))
    return path


def _is_forked_child(p: psutil.Process) -> bool:
    try:
        return "RayTrainWorker" in " ".join(p.parent().cmdline())
    except (psutil.Error, AttributeError):
        return False


class PeakRSS(threading.Thread):
    """Peak resident memory of the driver, of each Ray Train worker and of the other Ray processes."""

    def __init__(self, driver: int, min_free: float):
        super().__init__(daemon=True)
        self.driver, self.min_free = driver, min_free
        self.peaks: dict[str, float] = {}
        self.starved = False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    mb = p.info["memory_info"].rss / 2**20
                except (psutil.Error, TypeError, AttributeError):
                    continue
                if p.info["pid"] == self.driver:
                    key = "driver"
                elif "RayTrainWorker" in cmd:
                    if _is_forked_child(p):
                        continue  # a helper the worker forked (it shares the worker's pages and its title)
                    key = f"worker {p.info['pid']}"
                elif cmd.startswith("ray::") and "IDLE" not in cmd:
                    key = "ray other"  # the largest of them: Ray Data tasks/actors, controller, board
                else:
                    continue
                self.peaks[key] = max(self.peaks.get(key, 0.0), mb)
            if psutil.virtual_memory().available < self.min_free * 2**30:
                self.starved = True
                psutil.Process(self.driver).kill()
                return
            time.sleep(0.2)


def measure(copies: int, workers: int, shards: int, min_free: float, corpus: str = "conll") -> dict:
    with tempfile.TemporaryDirectory(prefix="zeroship-ingest-") as tmp:
        folder = Path(tmp)
        train = make_copies(folder, copies, shards, corpus)
        size = sum(f.stat().st_size for f in ([train] if train.is_file() else train.iterdir()))
        start = time.time()
        proc = subprocess.Popen([str(Path(sys.executable).parent / "launch"),
                                 str(recipe(folder, train, workers, corpus))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        watch = PeakRSS(proc.pid, min_free)
        watch.start()
        _, err = proc.communicate()
        watch.done.set()
        watch.join()
        row = {"copies": copies, "mb": size / 2**20, "wall_s": time.time() - start, "peaks": watch.peaks}
        if watch.starved:
            return {**row, "failed": f"stopped: under {min_free} GiB of memory left"}
        if proc.returncode != 0:
            return {**row, "failed": f"launch exited {proc.returncode}: {err.strip().splitlines()[-1][:120]}"}
        run = next((folder / "runs").glob("run-*"))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        startup = next(r for r in records if r["kind"] == "startup")
        return {**row, "first_step_s": startup["to_first_step_s"], "ray_data_s": startup["seconds"].get("ray_data"),
                "tokenization_s": startup["seconds"].get("tokenization", startup["seconds"].get("data_shards", 0.0)),
                "plan_s": startup["seconds"].get("launch_and_plan", 0.0)}


def feed_rate(copies: int, batch_size: int = 32) -> dict:
    """Windows per second through read → parse → tokenize (Ray Data tasks) → batches (one consumer)."""
    import os
    import random

    from launcher.data.features import collate
    from launcher.data.ingest import read_split, tokenize
    from launcher.data.stream import chunk_batches, features
    from launcher.recipe.schema import resolve_encoder
    from zeroship.ray_session import init_ray

    init_ray()
    data = {"format": "conll"}
    labels = ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER"]
    with tempfile.TemporaryDirectory(prefix="zeroship-feed-") as tmp:
        train = make_copies(Path(tmp), copies, 1)
        start = time.time()
        rows, _ = read_split(str(train), data, "token_classification", "data.train")
        ds = tokenize(rows, resolve_encoder("packaged:all-MiniLM-L6-v2"), "token_classification", labels, 128, 32,
                      casing=True, label_all=True)
        windows, tokens, rng = 0, 0, random.Random(0)
        for columns in ds.iter_batches(batch_size=batch_size * 64, batch_format="numpy"):
            for batch in chunk_batches(columns, batch_size, rng):
                collate(features(columns, batch), 0, True)
            windows += len(columns["input_ids"])
            tokens += sum(len(ids) for ids in columns["input_ids"])  # unpadded: what the tokenizer made
        seconds = time.time() - start
    cpus = os.cpu_count() or 1
    return {"copies": copies, "windows": windows, "seconds": seconds, "per_s": windows / seconds,
            "per_cpu_s": windows / seconds / cpus, "tokens_per_cpu_s": tokens / seconds / cpus, "cpus": cpus}


def step_rate(copies: int, steps: int = 24, batch_size: int = 32) -> dict:
    """Windows per second one training worker's step consumes, on this machine's CPU: a real `launch` of
    the whole packaged MiniLM (6 layers) on the same corpus and windows as feed_rate (max_length 128,
    stride 32, casing, every sub-token labelled), 1 worker, ZeRO-0, fp32; Ray Data streams beside it.
    The median of the run's three `train_samples_per_s` records (each over 8 steps, the steps alone)."""
    with tempfile.TemporaryDirectory(prefix="zeroship-step-") as tmp:
        folder = Path(tmp)
        train = make_copies(folder, copies, 1)
        validation = folder / "validation.conll"  # 200 sentences: the evaluations are not what is timed
        validation.write_text("\n\n".join(splits("conll")[1].read_text().strip().split("\n\n")[:200]) + "\n")
        path = folder / "step.yaml"
        path.write_text(json.dumps({  # JSON is YAML
            "model": {"encoder": "packaged:all-MiniLM-L6-v2", "task": "token_classification", "casing": True},
            "data": {"format": "conll", "train": str(train), "validation": str(validation),
                     "max_length": 128, "stride": 32, "label_all_tokens": True},
            "train": {"epochs": 1, "max_steps": steps, "batch_size": batch_size, "lr": 1e-4,
                      "eval_every": steps // 3, "metric": "eval_f1"},
            "deepspeed": {"zero_stage": 0, "precision": "fp32"},
            "scaling": {"workers": 1, "cpus_per_worker": 1},
            "run": {"storage": str(folder / "runs")},
        }))
        res = subprocess.run([str(Path(sys.executable).parent / "launch"), str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"the step-rate launch failed: {(res.stdout + res.stderr)[-2000:]}")
        run = next((folder / "runs").glob("run-*"))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["train_samples_per_s"] for r in records if "train_samples_per_s" in r)
    step_s = sorted(r["train_step_s"] for r in records if "train_step_s" in r)
    tokens = sorted(r["train_tokens_per_s"] for r in records if "train_tokens_per_s" in r)
    return {"per_s": rates[len(rates) // 2], "step_s": step_s[len(step_s) // 2], "batch_size": batch_size,
            "tokens_per_s": tokens[len(tokens) // 2]}


def feed_table(feed: dict, step: dict, gpu_rate: float | None) -> str:
    """The feed rate against what a step consumes, and the arithmetic cluster/README.md states."""
    lines = ["| corpus | windows | seconds | windows/s | windows/s per CPU | tokens/s per CPU |",
             "|---|---|---|---|---|---|",
             f"| {feed['copies']}× CoNLL-2003 train, max_length 128, stride 32, casing | {feed['windows']} "
             f"| {feed['seconds']:.1f} | {feed['per_s']:.0f} | {feed['per_cpu_s']:.0f} ({feed['cpus']} CPUs) "
             f"| {feed['tokens_per_cpu_s']:.0f} |",
             "", "| a step of | consumes windows/s | tokens/s | data CPUs it needs (÷ windows/s per CPU) |",
             "|---|---|---|---|",
             f"| MiniLM (6 layers), 1 worker on this machine's CPU, batch {step['batch_size']} "
             f"({step['step_s']:.2f} s a step) | {step['per_s']:.1f} | {step['tokens_per_s']:.0f} "
             f"| {step['per_s'] / feed['per_cpu_s']:.3f} |"]
    if gpu_rate:
        lines.append(f"| a GPU worker (--step-rate, measured on the GPU) | {gpu_rate:.0f} | "
                     f"| {gpu_rate / feed['per_cpu_s']:.2f} |")
    return "\n".join(lines)


def base_of(rows: list[dict], r: dict) -> float | None:
    """The 1× row's time to the first step in `r`'s round (a ratio compares rows measured side by side)."""
    return next((b["first_step_s"] for b in rows if b["copies"] == 1 and "failed" not in b
                 and b.get("round", 1) == r.get("round", 1)), None)


def table(rows: list[dict]) -> str:
    rounds = max((r.get("round", 1) for r in rows), default=1) > 1
    lines = ["| " + ("round | " if rounds else "") + "copies | train MB | driver peak RSS (MB) | worker peak RSS (MB) "
             "| other Ray peak (MB) | launch → first step (s) | vs 1× | of which plan (s) | ray data phase (s) "
             "| worker data phase (s) |",
             "|---" * (11 if rounds else 10) + "|"]
    for r in rows:
        base = base_of(rows, r)
        workers = sorted(v for k, v in r["peaks"].items() if k.startswith("worker"))
        shown = " / ".join(f"{w:.0f}" for w in workers) or "–"
        head = ((f"| {r.get('round', 1)} " if rounds else "")
                + f"| {r['copies']}× | {r['mb']:.0f} | {r['peaks'].get('driver', 0):.0f} | {shown} "
                f"| {r['peaks'].get('ray other', 0):.0f} ")
        if "failed" in r:
            lines.append(head + f"| {r['failed']} (after {r['wall_s']:.0f} s) | | | | |")
        else:
            ray_data = "–" if r["ray_data_s"] is None else f"{r['ray_data_s']:.1f}"
            ratio = f"{r['first_step_s'] / base:.2f}×" if base else "–"
            lines.append(head + f"| {r['first_step_s']:.1f} | {ratio} | {r['plan_s']:.1f} | {ray_data} "
                                f"| {r['tokenization_s']:.1f} |")
    return "\n".join(lines)


def medians(rows: list[dict]) -> str:
    """Over `--repeat` rounds: each size's median time to the first step and its median ratio to the 1× row
    of the same round (on a 2-core box one launch's time moves by a third from run to run)."""
    out = ["| copies | rounds | launch → first step, median (s) | vs 1× per round | vs 1×, median |",
           "|---|---|---|---|---|"]
    for copies in dict.fromkeys(r["copies"] for r in rows):
        done = [r for r in rows if r["copies"] == copies and "failed" not in r]
        if not done:
            continue
        ratios = [r["first_step_s"] / b for r in done if (b := base_of(rows, r))]
        out.append(f"| {copies}× | {len(done)} | {statistics.median(r['first_step_s'] for r in done):.1f} "
                   f"| {', '.join(f'{x:.2f}×' for x in ratios) or '–'} "
                   f"| {f'{statistics.median(ratios):.2f}×' if ratios else '–'} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=1, help="write each corpus as a folder of this many files")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="measure every size N times, in rounds (1×, 16×, … then again), and add their medians")
    ap.add_argument("--min-free-gb", type=float, default=2.0)
    ap.add_argument("--label", default="", help="a word for the results heading (e.g. before/after)")
    ap.add_argument("--corpus", choices=["conll", "quickstart"], default="conll",
                    help="what is copied: CoNLL-2003 train, or the quickstart's toy train split (57 KB)")
    ap.add_argument("--feed-rate", action="store_true",
                    help="the input pipeline's throughput alone (no model), against what a training step consumes")
    ap.add_argument("--step-rate", type=float, metavar="WINDOWS_PER_S",
                    help="with --feed-rate: what a GPU worker's step consumes (train_samples_per_s of a GPU run, "
                         "e.g. from benchmarks/gpu.sh), added as a row")
    args = ap.parse_args()
    if args.step_rate is not None and not args.step_rate > 0:
        ap.error(f"--step-rate: windows per second must be above 0, got {args.step_rate}")
    if args.feed_rate:
        copies = args.copies[0] if args.copies != [1, 16, 64] else 4
        feed = feed_rate(copies)  # alone on the machine first, then the training step alone
        out = feed_table(feed, step_rate(copies), args.step_rate)
        print(out)
        append_results("Ingest: the input pipeline's feed rate (no model)",
                       "benchmarks/ingest.py " + " ".join(sys.argv[1:]), out)
        return
    if args.repeat < 1:
        ap.error(f"--repeat: at least 1 round, got {args.repeat}")
    rows = []
    for round_ in range(1, args.repeat + 1):
        for copies in args.copies:
            rows.append({**measure(copies, args.workers, args.shards, args.min_free_gb, args.corpus), "round": round_})
            print(table(rows[-1:]), flush=True)
    out = table(rows) + ("\n\n" + medians(rows) if args.repeat > 1 else "")
    print(out)
    name = f"Ingest ({args.corpus}): driver and worker memory, time to first step, by corpus size" + (
        f" ({args.label})" if args.label else "")
    append_results(name, "benchmarks/ingest.py " + " ".join(sys.argv[1:]), out)


if __name__ == "__main__":
    main()
