"""What one `launch` costs before and around its training: runs the quickstart recipe (by default for
one optimizer step) several times and reports, per launch, the time to the first optimizer step by
phase (metrics.jsonl's `startup` record), the wall time to exit, and the CPU-seconds of every process
the launch started, grouped by what it is (the driver, Ray's daemons, each kind of Ray worker).

On a 2-core machine the start-up is CPU-bound: a dozen Python processes (Ray's daemons, Ray Train's
controller and workers, Ray Data's tasks and coordinators) each import their libraries at once, so
CPU-seconds are the steadier measure of what a change removed; wall times move by ±5-10 s between
identical launches here.

    .venv/bin/python benchmarks/startup.py [--launches 3] [--label "after: ..."] [-- overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "quickstart_ner.yaml"
HZ = os.sysconf("SC_CLK_TCK")


def role(cmdline: str) -> str:
    """A process's kind from its command line (Ray workers retitle themselves `ray::Name`)."""
    if "bin/launch" in cmdline:
        return "launch (driver)"
    found = re.search(r"ray::([A-Za-z_]+)", cmdline)
    if found:
        return f"ray::{found.group(1)}"
    for daemon in ("gcs_server", "raylet", "dashboard/agent.py", "dashboard.py", "runtime_env/agent",
                   "log_monitor", "monitor.py"):
        if daemon in cmdline:
            return "Ray daemon: " + daemon.rsplit("/", 1)[-1].removesuffix(".py")
    if "default_worker" in cmdline or "setup_worker" in cmdline:
        return "Ray worker (idle or starting)"
    return "other: " + cmdline[:40]


class CpuWatch:
    """CPU-seconds (user + system) of every process that appears while it runs, sampled every 0.5 s
    (the last sample before a process exits is what it counts: a few tenths of a second low at most)."""

    def __init__(self):
        self.before = {int(p) for p in os.listdir("/proc") if p.isdigit()}
        self.seen: dict[int, list] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit() or int(name) in self.before:
                    continue
                try:
                    fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
                    cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                cpu = (int(fields[11]) + int(fields[12])) / HZ
                entry = self.seen.setdefault(int(name), [0.0, ""])
                entry[0] = max(entry[0], cpu)
                if cmd.strip():
                    entry[1] = cmd
            time.sleep(0.5)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for cpu, cmd in self.seen.values():
            out[role(cmd)] = out.get(role(cmd), 0.0) + cpu
        return out


def one_launch(runs: Path, overrides: list[str]) -> dict:
    started = time.time()
    with CpuWatch() as watch:
        res = subprocess.run(
            [str(Path(sys.executable).parent / "launch"), str(RECIPE), *overrides, "--runs", str(runs)],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    wall = time.time() - started
    if res.returncode != 0:
        raise SystemExit(f"launch failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    run = sorted(runs.glob("run-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    startup = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return {"wall_s": wall, "startup": startup, "cpu": watch.by_role()}


def table(results: list[dict]) -> str:
    from launcher.driver.startup import PHASES

    med = statistics.median
    names = [name for name, _, _ in PHASES]
    lines = ["| launch | wall (s) | to first step (s) | " + " | ".join(n.replace("_", " ") for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for i, r in enumerate(results, 1):
        sec = r["startup"]["seconds"]
        lines.append(f"| {i} | {r['wall_s']:.1f} | {r['startup']['to_first_step_s']:.1f} | "
                     + " | ".join(f"{sec.get(n, 0):.1f}" for n in names) + " |")
    roles = sorted({k for r in results for k in r["cpu"]}, key=lambda k: -med(r["cpu"].get(k, 0) for r in results))
    total = [sum(r["cpu"].values()) for r in results]
    lines += ["", f"CPU-seconds of the processes each launch started (median of {len(results)}; per launch: "
              + ", ".join(f"{t:.0f}" for t in total) + "):", "", "| process | CPU-s |", "|---|---|",
              f"| **all** | **{med(total):.1f}** |"]
    lines += [f"| {k} | {med(r['cpu'].get(k, 0) for r in results):.1f} |" for k in roles
              if med(r["cpu"].get(k, 0) for r in results) >= 0.5]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--label", default="")
    ap.add_argument("overrides", nargs="*", help="recipe overrides (default: train.max_steps=1)")
    args = ap.parse_args()
    overrides = args.overrides or ["train.max_steps=1"]
    with tempfile.TemporaryDirectory(prefix="zs-startup-") as tmp:
        results = [one_launch(Path(tmp) / "runs", overrides) for _ in range(args.launches)]
    out = (
        (f"{args.label}\n\n" if args.label else "")
        + f"Recipe: `recipes/quickstart_ner.yaml {' '.join(overrides)}`\n\n"
        + table(results)
    )
    print(out)
    from benchmarks.results import append_results

    append_results("startup", " ".join(["benchmarks/startup.py", *sys.argv[1:]]), out)


if __name__ == "__main__":
    main()
