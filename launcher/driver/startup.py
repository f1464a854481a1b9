"""Where the time before the first optimizer step goes.

The driver stamps when the `launch` process started, when its plan was ready (recipe and data
checked), when Ray was up and when Ray Data had the splits tokenized; rank 0 stamps when its training
function began, when its imports, its
tokenized data, its model and its DeepSpeed engine were ready, and when the first optimizer step
ended. `record` turns the stamps into one `kind: startup` record (the first line of metrics.jsonl)
with a duration per phase. Stamps are wall-clock (`time.time()`), so on a multi-node cluster the
driver→worker phase also carries the nodes' clock offset (NTP keeps it to milliseconds).
"""

from __future__ import annotations

import time

# (phase, from stamp, to stamp); the phases tile the time from the process start to the first step
PHASES = (
    ("launch_and_plan", "process", "plan"),  # Python imports, recipe and data validation
    ("ray_start", "plan", "ray"),  # a local Ray, or connecting to a cluster
    ("ray_data", "ray", "datasets"),  # the lazy pipeline built (launcher.data.ingest)
    ("worker_group_start", "datasets", "worker"),  # placement group, worker processes, torch.distributed
    ("worker_imports", "worker", "imports"),  # torch, transformers, deepspeed in the worker
    ("data_shards", "imports", "data"),  # the tokenizer, this rank's shards (their stream starts in a thread)
    ("model_load", "data", "model"),  # the pretrained encoder and the head
    ("deepspeed_initialize", "model", "engine"),  # engine, optimizer, ZeRO partitioning; resume load
    ("first_step", "engine", "first_step"),  # the first optimizer step (and a warm start's first eval)
)


def process_start() -> float:
    """When this process started (the user pressed enter), not when this module was imported."""
    import psutil

    return psutil.Process().create_time()


def record(driver: dict[str, float], event: dict) -> dict:
    """The metrics.jsonl record from the driver's stamps and rank 0's `startup` event. After a worker
    restart only the worker's phases are meaningful (the driver's stamps are from the first start)."""
    resumed = event.get("resumed_from_step")
    stamps = {**(driver if resumed is None else {}), **event["stamps"]}
    seconds = {name: round(stamps[b] - stamps[a], 2) for name, a, b in PHASES if a in stamps and b in stamps}
    origin = "process" if "process" in stamps else "worker"
    return {"kind": "startup", "trial": event.get("trial", ""), "resumed_from_step": resumed,
            "to_first_step_s": round(stamps["first_step"] - stamps[origin], 2), "from": origin,
            "seconds": seconds, "time": time.time()}


def summary(rec: dict) -> str:
    """One console line: the total and its phases, largest first."""
    parts = sorted(rec["seconds"].items(), key=lambda kv: -kv[1])
    where = "launch" if rec["from"] == "process" else "the workers' restart"
    return (f"first optimizer step {rec['to_first_step_s']:.1f} s after {where} ("
            + ", ".join(f"{name.replace('_', ' ')} {s:.1f}" for name, s in parts) + ")")
