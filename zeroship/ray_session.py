"""Joining Ray: the cluster when one is there, else a private local Ray on loopback.

Shared by `launch` (which then checks the cluster can hold the recipe) and `zeroship serve`. Imports
nothing heavy, so a serving process never loads torch.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

_LEAN = False  # init_ray started a private Ray without a dashboard (see lean)


def init_ray(env_vars: dict[str, str] | None = None, log_to_driver: bool = True, dashboard: bool = False,
             logging_level: int | None = None) -> str:
    """`ray.init` against RAY_ADDRESS when set (as under `ray job submit`), else a local Ray whose
    listeners bind 127.0.0.1 (ZEROSHIP_RAY_TMPDIR picks its temp folder). Returns where it is.
    `log_to_driver`: stream the workers' stdout/stderr to this process's console (else only Ray's files).
    `dashboard`: give the local Ray its dashboard, for Ray Train's placement-group cleaner (a sweep's).
    `logging_level`: of this process's "ray" logger (`zeroship serve` keeps Ray's banners off its console)."""
    import ray

    if ray.is_initialized():
        return "existing ray session"
    runtime_env = {"env_vars": dict(env_vars or {})}
    if logging_level is not None:
        import logging

        logging.getLogger("ray").setLevel(logging_level)  # before init: its own warnings come early
    kwargs: dict[str, Any] = {} if logging_level is None else {"logging_level": logging_level}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=log_to_driver, **kwargs)
        return f"cluster at {os.environ['RAY_ADDRESS']}"
    # Loopback-only listeners need RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported:
    # the CLI entry points set it (launcher.cli.process_defaults).
    if os.environ.get("ZEROSHIP_RAY_TMPDIR"):
        kwargs["_temp_dir"] = os.environ["ZEROSHIP_RAY_TMPDIR"]
    if dashboard:
        # It serves the State API that Ray Train's placement-group cleaner polls; without an explicit
        # address the cleaner looks for "the" local Ray, and fails with "Found multiple active Ray
        # instances" when another launch on this machine runs its own. So the dashboard gets a port
        # chosen here, and every process of the job (and this driver) is told where it is.
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
    # A Ray started here is this process's child and so is every worker: they inherit os.environ.
    # Passing the variables as the job's runtime_env instead makes every actor's environment differ
    # from the idle workers Ray prestarts, so none of them can be used: the progress board then
    # waits for a fresh Python process (~3 s on 2 cores) before the trainer starts.
    os.environ.update(runtime_env["env_vars"])
    # Ray Train's preemption watcher (one more actor process per run) polls for nodes a cloud
    # autoscaler is draining; a private one-node Ray has none.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # One logical CPU more than the machine has: Ray Train keeps the workers' CPUs out of Ray Data's
    # budget, and the data tasks (launcher.data.ingest, a quarter CPU each) need some to run at all.
    start_local(lambda: ray.init(
        num_cpus=(os.cpu_count() or 1) + 1,  # = + plan.DATA_CPUS (not imported: serve loads no launcher.driver.plan)
        include_dashboard=dashboard,
        _node_ip_address="127.0.0.1",
        log_to_driver=log_to_driver,
        **kwargs,
    ))
    global _LEAN
    _LEAN = not dashboard
    return f"local ray ({os.cpu_count()} CPUs, 127.0.0.1)"


START_TRIES = 3
NODE_TIMEOUT = "timed out during startup"  # Ray's message when its raylet did not register in 30 s


def start_local(init, tries: int = START_TRIES) -> None:
    """Run `init` (a local `ray.init`), again when Ray's node did not come up. The raylet waits at most
    15 s for its dashboard agent, a Python process that imports a lot: on a busy 2-core machine (two
    launches at once beside other work) it can miss that, the raylet aborts, and `ray.init` raises
    "The current node timed out during startup" after 30 s. Neither wait can be configured in Ray 2.60
    (RAY_agent_register_timeout_ms does not reach it), so the processes that attempt started, all this
    process's children, are ended and Ray is started afresh."""
    import sys

    import psutil

    me = psutil.Process()
    for attempt in range(1, tries + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            init()
            return
        except Exception as exc:
            if NODE_TIMEOUT not in str(exc) or attempt == tries:
                raise
            left = [p for p in me.children(recursive=True) if p.pid not in before]
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(left, timeout=10)
            print(f"ray: the local Ray's node did not start in time (a busy machine?); starting it again "
                  f"({attempt + 1}/{tries})", file=sys.stderr, flush=True)


def lean() -> bool:
    """Whether this process started the Ray it is on without a dashboard: a private Ray, gone when
    the process exits, for runs that need neither the dashboard nor Ray Train's placement-group
    cleaner (launcher.driver.trainer.trainer_class). Without the dashboard ~19 CPU-s and ~5 s of
    `ray.init` less per launch on 2 cores (benchmarks/RESULTS.md)."""
    return _LEAN


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now (IPv4 or IPv6)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
