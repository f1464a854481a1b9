"""`export bench RUN`: PyTorch eager vs every ONNX variant in the bundle, same inputs, one process.

Threads are pinned (torch and onnxruntime alike) and stated; each figure is the median of
`repeats` timed runs after a warm-up. b=1 uses real validation sentences one at a time (latency);
b=32 uses batches of 32 padded to their longest (throughput), except for a variant whose answers depend on
the batch (dynamic int8), which is timed as the runtime serves it: the same 32 sentences one per call.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from rich.table import Table

from export.onnx import load_validation, ort_forward, resolve_run
from export.runtime import batch_independent, make_session, read_manifest, variant_files
from launcher.data.features import collate
from launcher.nn.model import load_model


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_bench(run_id: str, runs_dir: str | Path, threads: int = 2, repeats: int = 20, console=None) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    run = resolve_run(run_id, runs_dir)
    bundle = run.bundle_dir
    manifest = read_manifest(bundle)
    model, meta = load_model(run.best_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(run.best_dir))
    val = load_validation(run, meta, tokenizer, manifest["max_length"], batch_size=32)
    feats, pad = val.features, tokenizer.pad_token_id
    with_tt = model.uses_token_type_ids
    singles32 = [collate([f], pad, with_tt) for f in feats[:32]]
    singles = singles32[:16]
    batch32 = collate(feats[:32], pad, with_tt)
    for b in singles32 + [batch32]:
        b.pop("labels")
    engines = {"torch eager": (model, True)}
    for variant in ("fp32", "optimized", "int8"):
        if variant_files(manifest)[variant] in manifest["files"]:
            names = list(manifest["inputs"])
            session = make_session(bundle / variant_files(manifest)[variant], threads=threads)
            engines[f"onnx {variant}"] = (ort_forward(session, names), batch_independent(manifest, variant))
    rows = {}
    with torch.no_grad():
        for name, (fwd, batched) in engines.items():
            lat = _time(lambda fwd=fwd: [fwd(**b) for b in singles], repeats)
            lat_per = [t / len(singles) * 1000 for t in lat]
            if batched:
                thr = _time(lambda fwd=fwd: fwd(**batch32), max(3, repeats // 4))
            else:
                thr = _time(lambda fwd=fwd: [fwd(**b) for b in singles32], max(3, repeats // 4))
            rows[name] = {"b1_ms_p50": statistics.median(lat_per),
                          "b1_ms_p90": sorted(lat_per)[int(0.9 * (len(lat_per) - 1))],
                          "b32_ms": statistics.median(thr) * 1000,
                          "b32_samples_per_s": 32 / statistics.median(thr), "b32_batched": batched}
    base = rows["torch eager"]
    for r in rows.values():
        r["b1_speedup"] = base["b1_ms_p50"] / r["b1_ms_p50"]
        r["b32_speedup"] = base["b32_ms"] / r["b32_ms"]
    lengths = [len(f.input_ids) for f in feats[:16]]
    settings = {"run": run.id, "threads": threads, "repeats": repeats, "b1_inputs": len(singles),
                "b1_mean_tokens": sum(lengths) / len(lengths), "b32_width": int(batch32["input_ids"].shape[1]),
                "onnxruntime_providers": ["CPUExecutionProvider"]}
    result = {"settings": settings, "results": rows}
    run.write_json(f"{bundle.name}/bench.json", result)  # inside a run: through the registry, atomically
    if console is not None:
        table = Table(title=f"export bench {run.id} ({threads} threads, median of {repeats})")
        for col in ("engine", "b=1 p50 ms", "b=1 p90 ms", "b=1 ×", "b=32 ms", "b=32 samples/s", "b=32 ×"):
            table.add_column(col, justify="right" if col != "engine" else "left")
        for name, r in rows.items():
            star = "" if r["b32_batched"] else "*"
            table.add_row(name, f"{r['b1_ms_p50']:.2f}", f"{r['b1_ms_p90']:.2f}", f"{r['b1_speedup']:.2f}",
                          f"{r['b32_ms']:.1f}{star}", f"{r['b32_samples_per_s']:.0f}{star}", f"{r['b32_speedup']:.2f}")
        if not all(r["b32_batched"] for r in rows.values()):
            table.caption = "* one sentence per call, as the runtime feeds a model whose answers depend on the batch"
        console.print(table)
    return result
