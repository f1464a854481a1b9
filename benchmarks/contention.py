"""What two busy processes cost each other on this machine's cores: the same CPU-bound job alone, then two
copies at once, for interpreter work (a pure-Python loop, what imports and Ray's Python processes do) and for
numeric work (a numpy matmul, what a training step does). Reported as each copy's CPU-seconds: on a machine
whose cores share nothing the two-at-once figures equal the one-alone figure.

The test suite runs two pytest processes on 2 cores (`make test`): this tells whether they slow each other's
instructions down, and, run at different times, how much the host's own load moves the same job (figures in
benchmarks/RESULTS.md).

    .venv/bin/python benchmarks/contention.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

JOBS = {
    "python loop": "x = 0\nfor i in range(30_000_000):\n    x += i * i",
    "numpy matmul": "import numpy as np\na = np.random.rand(600, 600)\nfor _ in range(150):\n    a @ a",
}
TIMED = "import os, time\nt = time.process_time()\n{job}\nprint(time.process_time() - t)"


def cpu_seconds(job: str, copies: int) -> list[float]:
    """Each copy's CPU-seconds for `job`, the copies started together (one thread each)."""
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", TIMED.format(job=job)], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(copies)]
    return [float(p.communicate()[0]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("| job | alone (CPU-s) | two at once (CPU-s each) | slowdown |")
    print("|---|---|---|---|")
    for name, job in JOBS.items():
        alone, both = [], []
        for _ in range(args.repeats):
            alone += cpu_seconds(job, 1)
            both += cpu_seconds(job, 2)
            time.sleep(1)
        a, b = statistics.median(alone), statistics.median(both)
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
