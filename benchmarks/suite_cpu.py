"""Where the test suite's CPU goes: a pytest plugin that charges each test the CPU time of its whole
process tree, then a report of the costliest tests and files.

On 2 cores the suite is CPU-bound (both cores ~96% busy), so a test's wall time depends on what the
other xdist process runs beside it; its CPU-seconds do not. Wall-clock `--durations` cannot see a
launch's Ray processes either: they are orphaned to init, so `os.times()` never counts them. Each xdist
worker therefore moves itself into a cpuacct cgroup of its own (Linux cgroup v1, writable as root, as on
the CI and development machines); every process it starts, Ray's included, inherits it, and the
cgroup's `cpuacct.usage` before and after each test phase is that phase's CPU.

    PYTHONPATH=benchmarks PYTEST_ADDOPTS="-p suite_cpu" make test   # writes /tmp/suite-cpu-<worker>.jsonl
    .venv/bin/python benchmarks/suite_cpu.py [--top 30]              # the report

Without a writable cpuacct hierarchy the plugin records wall time only (cpu is null) and says so.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import time

import pytest

OUT = os.environ.get("SUITE_CPU_OUT", "/tmp/suite-cpu")
CPUACCT = "/sys/fs/cgroup/cpuacct"
_group: str | None = None


def pytest_configure(config) -> None:
    global _group
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    for old in glob.glob(f"{OUT}-{worker}.jsonl"):
        os.unlink(old)
    group = f"{CPUACCT}/zeroship-suite-{worker}-{os.getpid()}"
    try:
        os.makedirs(group, exist_ok=True)
        with open(f"{group}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        _group = group
    except OSError as exc:
        print(f"suite_cpu: no cpuacct cgroup ({exc}); recording wall time only", file=sys.stderr)


def pytest_unconfigure(config) -> None:
    """Leave the cgroup and remove it (it stays while a process started in it still runs)."""
    if _group is None:
        return
    try:
        with open(f"{CPUACCT}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        os.rmdir(_group)
    except OSError:
        pass


def _cpu() -> float | None:
    if _group is None:
        return None
    with open(f"{_group}/cpuacct.usage") as f:
        return int(f.read()) / 1e9


def _measure(item, phase: str):
    wall, cpu = time.time(), _cpu()
    yield
    after = _cpu()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(f"{OUT}-{worker}.jsonl", "a") as f:
        f.write(json.dumps({"id": item.nodeid, "phase": phase, "wall": time.time() - wall,
                            "cpu": None if cpu is None else after - cpu}) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _measure(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _measure(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _measure(item, "teardown")


def report(top: int) -> None:
    rows = [json.loads(line) for path in sorted(glob.glob(f"{OUT}-*.jsonl")) for line in open(path)]
    if not rows:
        sys.exit(f"no {OUT}-*.jsonl: run the suite with the plugin first (see this file's docstring)")
    tests: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    files: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for r in rows:  # a session fixture is charged to the test whose setup built it
        for key, table in ((r["id"], tests), (r["id"].split("::")[0], files)):
            table[key][0] += r["wall"]
            table[key][1] += r["cpu"] or 0.0
    print(f"{len(tests)} tests: wall {sum(t[0] for t in tests.values()):.0f} s summed over the processes, "
          f"CPU {sum(t[1] for t in tests.values()):.0f} s")
    for title, table in (("tests", tests), ("files", files)):
        print(f"\n{'CPU-s':>7} {'wall s':>7}  {title}, costliest first")
        for name, (wall, cpu) in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"{cpu:7.1f} {wall:7.1f}  {name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=30)
    report(parser.parse_args().top)
