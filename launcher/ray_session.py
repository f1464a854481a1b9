"""Joining Ray: the cluster when one is there, else a private local Ray on loopback.

Shared by `launch` (which then checks the cluster can hold the recipe) and `zeroship serve`. Imports
nothing heavy, so a serving process never loads torch.
"""

from __future__ import annotations

import os
from typing import Any


def init_ray(env_vars: dict[str, str] | None = None) -> str:
    """`ray.init` against RAY_ADDRESS when set (as under `ray job submit`), else a local Ray whose
    listeners bind 127.0.0.1 (ZEROSHIP_RAY_TMPDIR picks its temp folder). Returns where it is."""
    import ray

    if ray.is_initialized():
        return "existing ray session"
    runtime_env = {"env_vars": dict(env_vars or {})}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True)
        return f"cluster at {os.environ['RAY_ADDRESS']}"
    # The dashboard serves the State API that Ray Train's placement-group cleaner polls; without
    # it the driver log fills with "Failed to query Ray Train Controller actor state".
    kwargs: dict[str, Any] = {}
    # Loopback-only listeners need RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported:
    # the CLI entry points set it (launcher.cli.process_defaults).
    if os.environ.get("ZEROSHIP_RAY_TMPDIR"):
        kwargs["_temp_dir"] = os.environ["ZEROSHIP_RAY_TMPDIR"]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", runtime_env=runtime_env, log_to_driver=True, **kwargs)
    return f"local ray ({os.cpu_count()} CPUs, 127.0.0.1)"
