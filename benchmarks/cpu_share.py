"""Who uses the CPUs while a launch trains: runs a command, waits until a Ray Train worker has used
`--after` CPU-seconds (start-up over, steady training), then samples every process for `--window`
seconds and prints each one's share (100% = one core), busiest last. On a 2-core machine the Ray
processes around the workers (controller, actors, raylet, GCS, dashboard) are what separates the
worker's step time from the same step in a plain process.

    .venv/bin/python benchmarks/cpu_share.py -- .venv/bin/launch recipes/quickstart_ner.yaml \\
        train.epochs=2 scaling.workers=1 scaling.cpus_per_worker=2 deepspeed.zero_stage=0 train.batch_size=32
"""

from __future__ import annotations

import argparse
import subprocess
import time

import psutil


def snapshot() -> dict[int, tuple[float, str]]:
    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd:
                t = p.info["cpu_times"]
                out[p.info["pid"]] = (t.user + t.system, cmd[:80])
        except (psutil.Error, TypeError):
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--after", type=float, default=25.0, help="worker CPU-seconds before sampling")
    ap.add_argument("--window", type=float, default=15.0)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            workers = [cpu for cpu, name in snapshot().values() if "RayTrainWorker" in name]
            if workers and max(workers) >= args.after:
                break
            time.sleep(1)
        else:
            raise SystemExit("the command ended before its workers trained for --after CPU-seconds")
        before = snapshot()
        time.sleep(args.window)
        after = snapshot()
    finally:
        proc.wait()
    rows = sorted(((after[p][0] - before[p][0]) / args.window * 100, after[p][1]) for p in after if p in before)
    rows = [r for r in rows if r[0] >= 0.5]
    for share, name in rows:
        print(f"{share:6.1f}%  {name}")
    others = sum(s for s, n in rows if "RayTrainWorker" not in n)
    print(f"everything but the workers: {others:.1f}% of one core")


if __name__ == "__main__":
    main()
