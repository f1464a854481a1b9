"""zeroship.ray_compat: each private Ray API zeroship relies on, checked against the installed Ray.

When one of these fails after a Ray upgrade, the private API moved: fix zeroship.ray_compat (and
only it), then the serving tests (tests/e2e/test_e2e_serve.py) show whether the behaviour came back.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from zeroship.ray_compat import CORE_PROCESSES, bind_replica_grpc_to


def test_replica_still_binds_its_grpc_server_through_the_patched_name():
    """Ray 2.60's replica starts its inter-deployment gRPC server with `add_port_to_grpc_server(server,
    "[::]:0")`, looked up in its own module: the name bind_replica_grpc_to replaces."""
    from ray.serve._private import replica

    assert callable(replica.add_port_to_grpc_server)
    source = inspect.getsource(replica)
    assert 'add_port_to_grpc_server(self._server, "[::]:0")' in source


def test_bind_replica_grpc_to_rewrites_only_the_wildcard_address():
    from ray.serve._private import replica

    seen = []
    original = replica.add_port_to_grpc_server
    try:
        replica.add_port_to_grpc_server = lambda server, address: seen.append(address) or 1
        bind_replica_grpc_to("127.0.0.1")
        bind_replica_grpc_to("127.0.0.1")  # idempotent: not wrapped twice
        replica.add_port_to_grpc_server(None, "[::]:0")
        replica.add_port_to_grpc_server(None, "10.1.2.3:5")
    finally:
        replica.add_port_to_grpc_server = original
    assert seen == ["127.0.0.1:0", "10.1.2.3:5"]


EXITS = r"""
import json, os, signal, time
import ray
import ray._private.worker as worker
from zeroship.ray_compat import exited_ray_processes
from zeroship.ray_session import init_ray
before = exited_ray_processes()  # no Ray yet
init_ray()
alive = exited_ray_processes()
kinds = sorted(worker._global_node.all_processes)
raylet = worker._global_node.all_processes["raylet"][0].process
os.kill(raylet.pid, signal.SIGKILL)
raylet.wait(30)
after = exited_ray_processes()
print(json.dumps({"before": before, "alive": alive, "kinds": kinds, "after": after, "pid": raylet.pid}), flush=True)
import psutil
for child in psutil.Process().children(recursive=True):  # the rest of this script's own Ray
    child.kill()
os._exit(0)  # the driver's Ray is half dead: do not wait for it
"""


def test_exited_ray_processes_sees_a_killed_raylet(ray_tmp):
    res = subprocess.run([sys.executable, "-c", EXITS], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "ZEROSHIP_RAY_TMPDIR": ray_tmp,
                              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["before"] == [] and got["alive"] == []
    assert set(CORE_PROCESSES) <= set(got["kinds"])  # Ray still records its node's processes by these names
    assert got["after"] == [f"raylet (pid {got['pid']}, exit code -9)"]


@pytest.mark.parametrize("lean", [False, True])
def test_without_placement_group_cleaner_drops_only_that_callback(lean):
    """Ray Train V2 adds its cleaner in the private `_create_default_callbacks`, which the lean trainer
    overrides; Ray's own trainer must still list the cleaner, and the lean one every other callback."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from zeroship.ray_compat import without_placement_group_cleaner

    scaling = ray.train.ScalingConfig(num_workers=1)
    cls = without_placement_group_cleaner(TorchTrainer) if lean else TorchTrainer
    names = [type(cb).__name__ for cb in cls(lambda config: None, scaling_config=scaling)._create_default_callbacks()]
    rays = [type(cb).__name__ for cb in TorchTrainer(lambda config: None, scaling_config=scaling)
            ._create_default_callbacks()]
    assert "PlacementGroupCleanerCallback" in rays and "BackendSetupCallback" in rays
    assert names == [n for n in rays if not (lean and n == "PlacementGroupCleanerCallback")]


def test_execution_options_are_the_data_configs_own():
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    from zeroship.ray_compat import execution_options

    options = execution_options(DataConfig(execution_options=ExecutionOptions(preserve_order=True)), "validation")
    assert isinstance(options, ExecutionOptions) and options.preserve_order is True
    assert execution_options(DataConfig(), "validation").preserve_order is False


SPLIT_STATS = r"""
import json, threading
import ray.data
from zeroship.ray_session import init_ray
from zeroship.ray_compat import dataset_operator_rows, split_operator_rows
init_ray()
ray.data.DataContext.get_current().execution_options.preserve_order = True

def tokenize_batch(batch):  # two rows out per row in, as a sentence becomes two windows
    return {"id": [i for i in batch["id"] for _ in (0, 1)]}

ds = ray.data.range(1000, override_num_blocks=4).repartition(target_num_rows_per_block=64)
splits = ds.map_batches(tokenize_batch, batch_size=100).streaming_split(2, equal=True)
rows = [0, 0]

def eat(i):
    for batch in splits[i].iter_batches(batch_size=128):
        rows[i] += len(batch["id"])

threads = [threading.Thread(target=eat, args=(i,)) for i in (0, 1)]
[t.start() for t in threads]
[t.join() for t in threads]
# a sweep's data (launcher.driver.sweep.tokenize_once): tokenized once into the object store, then split
mat = ds.map_batches(tokenize_batch, batch_size=100).materialize()
again = mat.streaming_split(2, equal=True)
threads = [threading.Thread(target=lambda i=i: sum(1 for _ in again[i].iter_batches())) for i in (0, 1)]
[t.start() for t in threads]
[t.join() for t in threads]
# a single worker's data (launcher.driver.trainer.shard_config): the dataset whole, as a plain iterator
from launcher.driver.trainer import shard_config
(one,) = shard_config().configure({"train": ds.map_batches(tokenize_batch, batch_size=100)}, 1, None, None)
plain_rows = sum(len(batch["id"]) for batch in one["train"].iter_batches(batch_size=128))
print(json.dumps({"stats": split_operator_rows(splits[0], "tokenize_batch"), "rows": rows,
                  "plain": split_operator_rows(one["train"], "tokenize_batch"), "plain_rows": plain_rows,
                  "plain_split": hasattr(one["train"], "_coord_actor"),
                  "plain_ordered": one["train"].get_context().execution_options.preserve_order,
                  "missing": split_operator_rows(splits[0], "no_such_operator"),
                  "unfamiliar": split_operator_rows(object(), "tokenize_batch"),
                  "materialized": dataset_operator_rows(mat, "tokenize_batch"),
                  "materialized_missing": dataset_operator_rows(mat, "no_such_operator"),
                  "materialized_unfamiliar": dataset_operator_rows(object(), "tokenize_batch"),
                  "split_of_materialized": split_operator_rows(again[0], "tokenize_batch")}))
"""


def test_split_and_dataset_operator_rows_read_ray_datas_statistics(ray_tmp):
    """The private paths read: a streaming_split iterator's `_coord_actor.stats()` (DatasetStats), whose
    summary keeps the operators before the split in `parents`, and a plain iterator's `_base_dataset`; each
    operator with `operator_name`, `total_input_num_rows` and `output_num_rows.sum`. Real Ray."""
    res = subprocess.run([sys.executable, "-c", SPLIT_STATS], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "ZEROSHIP_RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["rows"] == [1000, 1000]  # what the two consumers read: every window once, split equally
    assert got["stats"] == [1000, 2000]  # Ray Data's own count: rows into the operator, windows out
    assert got["missing"] is None and got["unfamiliar"] is None  # no such operator / an unfamiliar Ray: no crash
    # one worker reads the dataset whole through a plain iterator, in order, with no split coordinator;
    # the private path there is its `_base_dataset`'s statistics of the execution it ran
    assert got["plain_rows"] == 2000 and got["plain"] == [1000, 2000]
    assert got["plain_split"] is False and got["plain_ordered"] is True
    # a materialized dataset's statistics (`get_stats_summary`): the execution that made it
    assert got["materialized"] == [1000, 2000]
    assert got["materialized_missing"] is None and got["materialized_unfamiliar"] is None
    # a split of it still shows that tokenization, which its readers did not do: why a sweep's trials tell
    # their tally that their data came tokenized (launcher.data.stream.Tally)
    assert got["split_of_materialized"] == [1000, 2000]


def test_repartition_cpus_sets_the_streaming_repartitions_task_resources():
    """The private path written: Dataset._logical_plan.dag is the StreamingRepartition operator that
    `repartition(target_num_rows_per_block=…)` adds, with a `ray_remote_args` dict its tasks are started with
    (Ray 2.60's public repartition takes no resources; without this its tasks ask for a whole CPU)."""
    import ray.data

    from zeroship.ray_compat import repartition_cpus

    ds = ray.data.range(10).repartition(target_num_rows_per_block=5)
    op = ds._logical_plan.dag
    assert type(op).__name__ == "StreamingRepartition" and op.ray_remote_args == {}
    assert repartition_cpus(ds, 0.25) is ds and op.ray_remote_args == {"num_cpus": 0.25}
    other = ray.data.range(10).map_batches(lambda b: b)  # not a repartition: left alone
    assert repartition_cpus(other, 0.25)._logical_plan.dag.ray_remote_args.get("num_cpus") is None


def test_direct_ingress_env_names_ray_reads_and_a_one_port_range_gives_that_port():
    """Every variable direct_ingress_env sets is one Ray 2.60's Serve reads; the replica's port comes from a
    PortAllocator over [MIN, MAX): one port wide, it hands out exactly the port asked for, and only once."""
    from ray.serve._private import constants
    from ray.serve._private.node_port_manager import NoAvailablePortError, PortAllocator

    from zeroship.ray_compat import direct_ingress_env

    env = direct_ingress_env(43210)
    source = inspect.getsource(constants)
    assert all(f'"{name}"' in source for name in env), [n for n in env if f'"{n}"' not in source]
    ports = PortAllocator(int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),
                          int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]), "HTTP", "node")
    assert ports.allocate("replica-1") == 43210
    with pytest.raises(NoAvailablePortError):
        ports.allocate("replica-2")


def test_reuse_address_for_direct_ingress_gives_serves_http_socket_so_reuseaddr(monkeypatch):
    """Ray 2.60's start_asgi_http_server makes its socket with `socket.socket(...)` of its module's `socket`,
    which reuse_address_for_direct_ingress replaces (once) by one whose sockets allow address reuse."""
    import socket

    from ray.serve._private import http_util

    from zeroship.ray_compat import reuse_address_for_direct_ingress

    assert "sock = socket.socket(" in inspect.getsource(http_util.start_asgi_http_server)
    monkeypatch.setattr(http_util, "socket", socket)  # restored after the test
    with socket.socket() as plain:
        assert plain.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
    reuse_address_for_direct_ingress()
    patched = http_util.socket
    reuse_address_for_direct_ingress()  # twice: still the one wrapper
    assert http_util.socket is patched and http_util.socket.AF_INET == socket.AF_INET
    with http_util.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    with socket.socket() as plain:  # the process's own sockets are untouched
        assert plain.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
