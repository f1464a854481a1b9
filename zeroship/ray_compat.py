"""Every private Ray API zeroship reaches, each in one place: serving (a private Ray's core processes,
the replica's gRPC bind), training (Ray Train's placement-group cleaner, DataConfig's execution options)
and ingest (Ray Data's per-operator statistics of a streaming split, of a plain iterator and of a
materialized dataset, a repartition's task resources).

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


def direct_ingress_env(port: int) -> dict[str, str]:
    """Environment for a private Ray whose one Serve replica answers HTTP itself, on `port`.

    Ray 2.60's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS, read by the controller and the replicas when
    they start): each ingress replica runs its own HTTP server on a port the controller hands out from
    [MIN_HTTP_PORT, MAX_HTTP_PORT), so a request skips Serve's proxy and router — on one 2-core box 264–272
    against 71–76 requests/s at 32 clients (benchmarks/RESULTS.md, serve_http of 2026-12-03). A range of
    one port puts the replica on the port asked for; a released port goes back to the pool at once (it is
    quarantined for HAProxy otherwise), so a restarted replica takes it again; and a stopping replica
    drains its requests for 1 s at least instead of 30 (which waits for load balancers to deregister it)."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def reuse_address_for_direct_ingress() -> None:
    """Give the HTTP socket this replica's direct ingress opens (direct_ingress_env) SO_REUSEADDR.

    Ray 2.60 creates it without: the connections it closes at shutdown then sit in TIME_WAIT bound to a
    socket that did not allow reuse, and for a minute nothing can listen on the port again — not the next
    `zeroship serve --port` of the same port. Serve's http_util is used in a replica only for that server.
    Called in the replica's constructor, before Serve starts the server."""
    import socket
    import types

    from ray.serve._private import http_util

    if getattr(http_util.socket, "_zeroship_reuse", False):
        return

    class ReuseAddressSocket(socket.socket):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    http_util.socket = types.SimpleNamespace(**{**vars(socket), "socket": ReuseAddressSocket, "_zeroship_reuse": True})


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


def _operator_rows(summary: Any, operator: str) -> tuple[int, int]:
    """(rows in, rows out) of the first operator whose name contains `operator` in a DatasetStatsSummary or
    the summaries before it (`parents`): StopIteration when none has it."""

    def summaries(summary: Any):
        yield summary
        for parent in summary.parents:
            yield from summaries(parent)

    op = next(op for s in summaries(summary) for op in s.operators_stats if operator in op.operator_name)
    return int(op.total_input_num_rows), int(op.output_num_rows.sum)


def split_operator_rows(iterator: Any, operator: str) -> tuple[int, int] | None:
    """(rows in, rows out) of the first Ray Data operator whose name contains `operator`, summed over its
    tasks, in the last execution behind a worker's data iterator; None when this Ray's look different.
    A `streaming_split` iterator: its split coordinator actor's private `stats()` (a DatasetStats whose
    summary holds the operators before the split as parents). A plain `Dataset.iterator()` (a single
    worker's, launcher.driver.trainer.shard_config): its private `_base_dataset`, which executed in this
    process (`dataset_operator_rows`)."""
    import ray

    if not hasattr(iterator, "_coord_actor") and hasattr(iterator, "_base_dataset"):
        return dataset_operator_rows(iterator._base_dataset, operator)
    try:
        return _operator_rows(ray.get(iterator._coord_actor.stats.remote(), timeout=60).to_summary(), operator)
    except (AttributeError, StopIteration, TypeError, ray.exceptions.GetTimeoutError):
        return None


def dataset_operator_rows(ds: Any, operator: str) -> tuple[int, int] | None:
    """The same for the execution that materialized `ds` (`get_stats_summary`, a DeveloperAPI); None when
    this Ray's look different."""
    try:
        return _operator_rows(ds.get_stats_summary(), operator)
    except (AttributeError, StopIteration, TypeError):
        return None


def repartition_cpus(ds: Any, num_cpus: float) -> Any:
    """`ds` (just made by `repartition(target_num_rows_per_block=…)`) with its repartition tasks asking for
    `num_cpus` instead of Ray's default whole CPU (the public API takes no resources for it): on a node
    whose data CPU is shared by quarter-CPU tasks, whole-CPU repartition tasks wait until every parse task
    has finished, so the first batch waited for the whole corpus to be parsed. Sets the logical operator's
    private `ray_remote_args`; `ds` unchanged when this Ray's plan looks different."""
    op = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    if type(op).__name__ == "StreamingRepartition" and isinstance(getattr(op, "ray_remote_args", None), dict):
        op.ray_remote_args["num_cpus"] = num_cpus
    return ds
