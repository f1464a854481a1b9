"""Append a benchmark's table to benchmarks/RESULTS.md with date, machine, versions and command."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(0).total_memory / 2**30
            gpu = f", GPU {torch.cuda.get_device_name(0)} ({memory:.0f} GiB)"
    except ImportError:
        pass
    return f"{os.cpu_count()} cores, {cpu}{gpu}"


def versions() -> str:
    import deepspeed
    import onnxruntime
    import ray
    import torch
    import transformers

    return (f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__},"
            f" ray {ray.__version__}, onnxruntime {onnxruntime.__version__}")


def append_results(name: str, command: str, table: str) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"\n## {name} — {stamp}\n\nMachine: {machine()}. {versions()}.\n"
             f"Command: `{command}`\n\n{table}\n")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in this folder; newest last.\n")
    with open(RESULTS, "a") as fh:
        fh.write(block)
