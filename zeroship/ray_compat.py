"""Every private Ray API zeroship reaches, each in one place: serving (a private Ray's core processes,
the replica's gRPC bind), training (Ray Train's placement-group cleaner, DataConfig's execution options)
and ingest (Ray Data's per-operator statistics).

Each use has a test in tests/base/test_ray_compat.py that fails loudly when a Ray upgrade removes or changes
what it relies on (Ray 2.60 here). Imports nothing heavy: the serving process loads no torch.
"""

from __future__ import annotations

from typing import Any

CORE_PROCESSES = ("gcs_server", "raylet")  # without either, this node's Ray is gone


def exited_ray_processes() -> list[str]:
    """`name (pid N, exit code C)` for each core process of the Ray node this process started itself
    (`ray.init()` without an address) that has exited; [] when it started none or all are alive.

    Ray keeps the Popen of every process it starts for its node in `ray._private.worker._global_node`;
    a driver otherwise learns of its Ray's death only when the GCS client gives up after 60 s."""
    import ray._private.worker as worker

    node = worker._global_node
    if node is None:
        return []
    dead = []
    for kind in CORE_PROCESSES:
        for info in node.all_processes.get(kind, []):
            code = info.process.poll()
            if code is not None:
                dead.append(f"{kind} (pid {info.process.pid}, exit code {code})")
    return dead


def bind_replica_grpc_to(host: str) -> None:
    """Make this Serve replica's inter-deployment gRPC server listen on `host` instead of every interface.

    Ray 2.60's replica binds that server to "[::]:0" whatever Serve's http_options say; the proxy reaches
    the replica through Ray's actor calls unless RAY_SERVE_USE_GRPC_BY_DEFAULT is set, and then on the
    node's address, so binding the node's address loses nothing. Called in the replica before Serve
    starts the server (the deployment's constructor runs first)."""
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "_zeroship_host", None) == host:
        return

    def bind(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            port = address.rsplit(":", 1)[1]
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return original(server, address)

    bind._zeroship_host = host  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind


def without_placement_group_cleaner(trainer_class: type) -> type:
    """`trainer_class` (a TorchTrainer) without the PlacementGroupCleanerCallback that Ray Train V2 adds to
    every run in its private `_create_default_callbacks` (launcher.driver.trainer: only on a lean private Ray)."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class LeanTrainer(trainer_class):
        def _create_default_callbacks(self):
            return [cb for cb in super()._create_default_callbacks()
                    if not isinstance(cb, PlacementGroupCleanerCallback)]

    LeanTrainer.__name__ = LeanTrainer.__qualname__ = f"Lean{trainer_class.__name__}"
    return LeanTrainer


def execution_options(data_config: Any, dataset: str) -> Any:
    """The ExecutionOptions a ray.train.DataConfig resolves for `dataset` (its private
    `_resolve_execution_options`: the same options Ray Train gives the splits it shards itself)."""
    return data_config._resolve_execution_options(dataset)


def operator_input_rows(ds: Any, operator: str) -> int | None:
    """Rows the first Ray Data operator whose name contains `operator` took in, summed over its tasks
    (from the executed dataset's private stats summary); None when this Ray's statistics look different."""
    try:
        ops = ds._get_stats_summary().operators_stats
        return next(int(op.total_input_num_rows) for op in ops if operator in op.operator_name)
    except (AttributeError, StopIteration, TypeError):
        return None
