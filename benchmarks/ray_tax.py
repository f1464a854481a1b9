"""What Ray's own processes cost the workers' step on a small CPU box, measured paired in time.

One process runs the workers' step (`launcher.worker.engine.train_step` on the engine `launch` builds, batch 32,
`--threads` threads, 2 by default; no Ray inside it) continuously. Around it, a private Ray as `launch`
starts one (raylet, GCS, agents) holds `--actors` idle actor processes, standing in for those a launch
keeps beside its worker (Ray Train's controller and synchronization actor, the progress board, Ray
Data's dataset manager, split coordinators, stats and autoscaling actors, a pooled worker: 9 on the
quickstart). Every `--period`
seconds all of Ray is paused (SIGSTOP) or resumed, so each step is timed either with Ray idling around it
or with nothing else on the machine, seconds apart: the machine's drift over minutes (±15% between
processes here) cancels, which comparing separate runs cannot do.

An idle Ray worker process wakes every 10 ms (its task loop's signal check, fixed in Ray 2.60), ~1% of
a core each; on 2 cores each wakeup also stalls one of the step's two threads at its next barrier.

    .venv/bin/python benchmarks/ray_tax.py [--stages 0 2 3] [--steps 100] [--actors 9] [--period 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def step_process(stage: int, steps: int, threads: int) -> None:
    """The child: build the workers' engine, then time each step and print it as [start, end]."""
    from benchmarks.train_overhead import worker_step

    step = worker_step(stage, threads, steps, batch_size=32)
    print("ready", flush=True)
    for i in range(steps):
        start = time.time()
        step(i)
        print(json.dumps([start, time.time()]), flush=True)


def ray_pids() -> list[int]:
    """Every process this one started (raylet, GCS, agents, actors), the step process excepted."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def measure(stage: int, steps: int, threads: int, period: float, pids: list[int]) -> dict:
    """Steps timed while Ray runs and while it is paused, alternating every `period` seconds."""
    from benchmarks.train_overhead import free_port

    child = subprocess.Popen([sys.executable, __file__, "--step-process", str(stage), "--steps", str(steps),
                              "--threads", str(threads)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "MASTER_PORT": free_port()})
    for line in child.stdout:  # DeepSpeed may print before the engine is ready
        if line.strip() == "ready":
            break
    switches: list[tuple[float, bool]] = []  # (time, Ray running from then on)
    done = threading.Event()

    def alternate() -> None:
        running = True
        switches.append((time.time(), running))
        try:
            while not done.wait(period):
                running = not running
                signal_all(pids, signal.SIGCONT if running else signal.SIGSTOP)
                switches.append((time.time(), running))  # once every process has its signal
        finally:
            signal_all(pids, signal.SIGCONT)

    thread = threading.Thread(target=alternate)
    thread.start()
    try:
        spans = [json.loads(line) for line in child.stdout if line.startswith("[")]
    finally:
        done.set()
        thread.join()
        child.wait()
    if child.returncode != 0:
        raise SystemExit(f"the step process failed at ZeRO-{stage} (exit {child.returncode})")

    def state(t: float) -> bool:
        before = [running for at, running in switches if at <= t]
        return before[-1] if before else True  # Ray runs until the first switch

    running, paused = [], []
    for start, end in spans[3:]:  # warm-up
        if state(start) == state(end):  # steps that straddle a switch count for neither
            (running if state(start) else paused).append(end - start)
    if not running or not paused:
        raise SystemExit(f"ZeRO-{stage}: {len(running)} steps with Ray running, {len(paused)} with it paused; "
                         "raise --steps or lower --period so that both sides get steps")
    return {"running_s": statistics.median(running), "paused_s": statistics.median(paused),
            "n_running": len(running), "n_paused": len(paused)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--actors", type=int, default=9, help="idle actor processes (a quickstart launch keeps 9)")
    ap.add_argument("--period", type=float, default=6.0, help="seconds between pausing and resuming Ray")
    ap.add_argument("--threads", type=int, default=2, help="the step's threads (2: both cores of a 2-core box)")
    ap.add_argument("--step-process", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps <= 3 or args.period <= 0 or args.threads < 1 or args.actors < 0:
        ap.error("--steps must be above 3 (the first 3 are warm-up), --period above 0, --threads at least 1, "
                 "--actors at least 0")
    if args.step_process is not None:
        step_process(args.step_process, args.steps, args.threads)
        return
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback listeners, as the CLI sets it
    import ray

    from zeroship.ray_session import init_ray

    with tempfile.TemporaryDirectory(prefix="zs-ray-tax-") as tmp:
        os.environ["ZEROSHIP_RAY_TMPDIR"] = tmp
        init_ray(log_to_driver=False)

        @ray.remote(num_cpus=0)
        class Idle:
            def ready(self) -> int:
                return os.getpid()

        actors = [Idle.remote() for _ in range(args.actors)]
        ray.get([a.ready.remote() for a in actors])
        time.sleep(3)  # let start-up settle
        pids = ray_pids()
        rows = {}
        try:
            for stage in args.stages:
                rows[stage] = measure(stage, args.steps, args.threads, args.period, pids)
                print(stage, rows[stage], flush=True)
        finally:
            signal_all(pids, signal.SIGCONT)
            ray.shutdown()
    lines = [
        f"Ray on loopback with {args.actors} idle actors ({len(pids)} processes in all), paused and resumed every "
        f"{args.period:g} s around the workers' step (batch 32, 1 process × {args.threads} "
        f"thread{'s' if args.threads > 1 else ''}):",
        "",
        "| stage | step, Ray idling around it (s) | step, Ray paused (s) | Ray's cost | steps (running / paused) |",
        "|---|---|---|---|---|",
    ]
    for stage, r in rows.items():
        lines.append(f"| ZeRO-{stage} | {r['running_s']:.3f} | {r['paused_s']:.3f} | "
                     f"{r['running_s'] / r['paused_s'] - 1:+.1%} | {r['n_running']} / {r['n_paused']} |")
    print("\n".join(lines))
    from benchmarks.results import append_results

    append_results("ray_tax: Ray's idle processes around the workers' step",
                   " ".join(["benchmarks/ray_tax.py", *sys.argv[1:]]), "\n".join(lines))


if __name__ == "__main__":
    main()
