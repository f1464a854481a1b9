"""The start-up record (launcher.driver.startup) and what the workers skip to start sooner."""

from __future__ import annotations

from conftest import run_deepspeed_script

from launcher.driver.startup import PHASES, record, summary

DRIVER = {"process": 100.0, "plan": 104.0, "ray": 110.0, "datasets": 113.0}
WORKER = {"worker": 125.0, "imports": 131.0, "data": 132.5, "model": 135.0, "engine": 140.0, "first_step": 141.0}


def test_phases_tile_the_time_to_the_first_step():
    rec = record(DRIVER, {"stamps": WORKER, "trial": "t1", "resumed_from_step": None})
    assert rec["kind"] == "startup" and rec["trial"] == "t1" and rec["from"] == "process"
    assert rec["to_first_step_s"] == 41.0
    assert rec["seconds"] == {"launch_and_plan": 4.0, "ray_start": 6.0, "ray_data": 3.0, "worker_group_start": 12.0,
                              "worker_imports": 6.0, "data_shards": 1.5, "model_load": 2.5,
                              "deepspeed_initialize": 5.0, "first_step": 1.0}
    assert list(rec["seconds"]) == [name for name, _, _ in PHASES]
    assert summary(rec).startswith("first optimizer step 41.0 s after launch (worker group start 12.0, ray start 6.0")


def test_after_a_worker_restart_only_the_workers_phases_count():
    rec = record(DRIVER, {"stamps": WORKER, "resumed_from_step": 10})
    assert rec["from"] == "worker" and rec["to_first_step_s"] == 16.0 and rec["resumed_from_step"] == 10
    assert "ray_start" not in rec["seconds"] and "worker_group_start" not in rec["seconds"]
    assert "after the workers' restart" in summary(rec)


def test_workers_do_not_build_deepspeeds_shared_memory_op():
    # the prelude calls skip_shm_comm_build() as train_worker does; DeepSpeed's comm backend then has
    # no shm op (building it is a 30-80 s JIT compile on a node's first launch)
    out = run_deepspeed_script("import deepspeed.comm.comm as c\n"
                               "print(json.dumps({'shm': c.cdb.shm_comm_op is None, 'name': c.cdb.name}))")
    assert out == {"shm": True, "name": "torch"}
