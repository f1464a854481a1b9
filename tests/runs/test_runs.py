"""Run registry: atomic id allocation, id validation, status file."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest
import yaml
from conftest import cli

from zeroship.errors import RunError
from launcher.runs.registry import Registry, normalize_run_id


def _allocate(root: str, barrier, queue) -> None:
    barrier.wait()  # every process starts allocating at the same moment
    queue.put(Registry(root).allocate().id)


def test_concurrent_allocation_gives_distinct_ids(tmp_path):
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(20), ctx.Queue()
    procs = [ctx.Process(target=_allocate, args=(str(tmp_path), barrier, queue)) for _ in range(20)]
    for p in procs:
        p.start()
    ids = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len(set(ids)) == 20
    assert sorted(int(i.split("-")[1]) for i in ids) == list(range(1, 21))


@pytest.mark.parametrize("bad", ["../x", "run-1/../../etc", "/etc/passwd", "run-", "run-1x", "..", "run-../1",
                                 "42/..", "run-1\x00", "", "run--1", "1e3"])
def test_bad_run_ids_refused(bad):
    with pytest.raises(RunError):
        normalize_run_id(bad)


def test_id_forms(tmp_path):
    reg = Registry(tmp_path)
    first, second = reg.allocate(), reg.allocate()
    assert (first.id, second.id) == ("run-1", "run-2")
    assert reg.get("1").dir == first.dir and reg.get("run-2").dir == second.dir
    assert reg.get("latest").id == "run-2"
    with pytest.raises(RunError, match="no run run-9"):
        reg.get("run-9")


def test_status_written_atomically_with_required_fields(tmp_path):
    run = Registry(tmp_path).allocate({"task": "token_classification"})
    status = json.loads(run.status_path.read_text())
    assert {"id", "state", "created", "updated", "error", "winner"} <= set(status)
    assert status["state"] == "pending"
    run.update(state="failed", error="boom")
    assert run.status()["state"] == "failed" and run.status()["error"] == "boom"
    assert not list(run.dir.glob(".status.json.*"))  # no temp files left behind


def test_runs_cli_lists_and_refuses_traversal(tmp_path):
    reg = Registry(tmp_path)
    reg.allocate({"task": "token_classification"}).update(
        state="succeeded", winner={"metric": "eval_f1", "value": 0.75})
    res = cli("zeroship", "runs", "--runs", str(tmp_path))
    assert res.returncode == 0 and "run-1" in res.stdout and "eval_f1=0.7500" in res.stdout
    res = cli("zeroship", "runs", "show", "../../etc", "--runs", str(tmp_path))
    assert res.returncode == 2 and "not a run id" in res.stderr
    res = cli("zeroship", "runs", "show", "run-77", "--runs", str(tmp_path))
    assert res.returncode == 2 and "no run run-77" in res.stderr


# ------------------------------------------------------------------ storage on a URI
def test_registry_on_a_uri_keeps_everything_at_the_uri(tmp_path, monkeypatch):
    from launcher.runs.registry import Registry

    store = tmp_path / "bucket"
    uri = f"file://{store}/runs"
    monkeypatch.setenv("ZEROSHIP_CACHE", str(tmp_path / "cache-a"))
    reg = Registry(uri)
    run = reg.allocate({"task": "token_classification"})
    assert run.id == "run-1" and run.location == f"{uri}/run-1" and run.ray_storage == f"{uri}/run-1/ray"
    run.update(state="running")
    run.append_metrics({"kind": "eval", "step": 1, "eval_f1": 0.5})
    (run.dir / "best").mkdir()
    (run.dir / "best" / "model.json").write_text("{}")
    (run.dir / "ray").mkdir()
    (run.dir / "ray" / "big.bin").write_text("Ray writes to the URI itself")
    run.push("best", "ray")
    remote = store / "runs" / "run-1"
    assert json.loads((remote / "status.json").read_text())["state"] == "running"
    assert (remote / "metrics.jsonl").read_text().count("eval_f1") == 1
    assert (remote / "best" / "model.json").is_file() and not (remote / "ray").exists()
    assert Registry(uri).allocate().id == "run-2"

    # another machine: an empty cache, everything comes from the URI (except ray/)
    monkeypatch.setenv("ZEROSHIP_CACHE", str(tmp_path / "cache-b"))
    other = Registry(uri)
    assert other.root != reg.root and other.ids() == [1, 2]
    got = other.get("latest")
    assert got.id == "run-2"
    got = other.get("run-1")
    assert got.status()["state"] == "running" and (got.dir / "best" / "model.json").is_file()
    assert [r.id for r in other.runs()] == ["run-1", "run-2"]
    with pytest.raises(RunError, match=f"{uri}/run-9"):
        other.get("run-9")


@pytest.mark.parametrize("storage, message", [
    ("ftp://host/runs", "unknown storage scheme ftp://"),
    ("file://relative/runs", "needs an absolute path"),
])
def test_bad_storage_uris_are_refused(storage, message):
    from zeroship.errors import RecipeError
    from launcher.runs.storage import check_storage

    with pytest.raises(RecipeError, match=message):
        check_storage(storage)
    check_storage("s3://bucket/prefix")  # known schemes pass without touching the network
    check_storage("/mnt/shared/runs")


@pytest.mark.parametrize("text", ["a" * 5000, "run-1\x00", "/" + "b" * 300])
def test_a_bundle_name_the_file_system_cannot_hold_is_a_bad_run_id_not_a_traceback(tmp_path, text):
    from launcher.runs.registry import bundle_folder

    with pytest.raises(RunError, match="not a run id"):
        bundle_folder(text, str(tmp_path / "runs"))
    if len(text) == 5000:  # and through the command line: exit 2, the same message
        res = cli("zeroship", "export", "predict", text, "hello", "--runs", str(tmp_path / "runs"))
        assert res.returncode == 2 and "Traceback" not in res.stderr and "not a run id" in res.stdout + res.stderr


def test_recorded_data_finds_a_job_copys_splits_again_in_this_checkout(tmp_path, monkeypatch):
    """A run launched under `ray job submit --working-dir .` recorded paths inside the job's copy of the
    checkout, which Ray deleted: they are read from the same place under this folder, with a note; a
    path that still exists, a URI, a path outside the launch's folder, one that climbs out with "..",
    and one missing here too stay as recorded (reading them then says what is missing)."""
    job = tmp_path / "ray" / "working_dir_files" / "_ray_pkg_1"  # gone: never created
    checkout, elsewhere = tmp_path / "checkout", tmp_path / "kept.conll"
    (checkout / "recipes" / "data").mkdir(parents=True)
    (checkout / "recipes" / "data" / "validation.conll").write_text("a O\n")
    (checkout / "recipes" / "data" / "shards").mkdir()
    (checkout / "recipes" / "data" / "shards" / "part-0.conll").write_text("a O\n")
    elsewhere.write_text("a O\n")
    run = Registry(tmp_path / "runs").allocate({"task": "token_classification", "cwd": str(job)})
    data = {"format": "conll", "train": f"{job}/recipes/data/shards/*.conll",
            "validation": f"{job}/recipes/data/validation.conll", "test": f"{job}/recipes/../../../kept.conll",
            "labels": ["O"]}
    (run.dir / "recipe.yaml").write_text(yaml.safe_dump({"data": data}))
    monkeypatch.chdir(checkout)
    found, notes = run.recorded_data()
    assert found["train"] == f"{checkout}/recipes/data/shards/*.conll"
    assert found["validation"] == f"{checkout}/recipes/data/validation.conll"
    assert found["test"] == data["test"] and found["labels"] == ["O"] and found["format"] == "conll"
    assert len(notes) == 2 and notes[1].startswith("data.validation:") and "./recipes/data/validation.conll" in notes[1]

    for kept in (str(elsewhere), "s3://bucket/val.conll", f"{job}/recipes/data/missing.conll",
                 "/elsewhere/recipes/data/validation.conll", f"{job}/x\udcff\x00.conll"):
        (run.dir / "recipe.yaml").write_text(yaml.safe_dump({"data": {**data, "validation": kept}}, allow_unicode=True))
        assert run.recorded_data()[0]["validation"] == kept

    run.update(cwd=None)  # a run from before `cwd` was recorded
    (run.dir / "recipe.yaml").write_text(yaml.safe_dump({"data": data}))
    assert run.recorded_data() == (data, [])


@pytest.mark.parametrize("text", ["- a list\n", "data: 3\n", "{{{\n", "model: {}\n", "\udcff"])
def test_recorded_data_of_an_unreadable_recipe_is_a_run_error(tmp_path, text):
    run = Registry(tmp_path / "runs").allocate({"task": "token_classification", "cwd": str(tmp_path)})
    (run.dir / "recipe.yaml").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(RunError) as err:
        run.recorded_data()
    assert "recipe.yaml" in str(err.value) and "launch it again" in str(err.value)
