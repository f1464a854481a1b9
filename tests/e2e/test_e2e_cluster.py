"""Cluster operations end to end: a simulated 2-node Ray cluster, `ray job submit`, TensorBoard event
files and `zeroship runs show`. Real Ray, real DeepSpeed, real runs; every listener on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import LOOPBACK_ENV, cli, free_port, tiny_ner_recipe, toy_ner_shards

pytestmark = pytest.mark.e2e

def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Parse TensorBoard event files (TFRecord framing: length, crc, Event proto, crc) independently
    of the writer: tag → [(step, value)]."""
    from tensorboardX.proto.event_pb2 import Event

    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                series.setdefault(value.tag, []).append((event.step, value.simple_value))
    return series


# ------------------------------------------------------------------ observability
def test_tensorboard_events_hold_the_eval_series(ner_run):
    evals = [json.loads(line) for line in (ner_run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("kind", "eval") == "eval"]
    series = read_scalars(ner_run / "tensorboard" / "train")
    assert [s for s, _ in series["eval/f1"]] == [e["step"] for e in evals]
    for (_, got), e in zip(series["eval/f1"], evals):
        assert abs(got - e["eval_f1"]) < 1e-6
    assert len(series["eval/loss"]) == len(evals)
    assert all(v > 0 for _, v in series["throughput/samples_per_s"] + series["throughput/tokens_per_s"])
    losses = series["train/loss"]
    assert len(losses) >= 10 and [s for s, _ in losses] == sorted(s for s, _ in losses)
    assert series["train/lr"] and all(v >= 0 for _, v in series["train/lr"])


def test_runs_show_prints_the_recipe_diff_history_and_winner(ner_run, tmp_path):
    # A copy of the real run whose base file was since edited: the diff must show the edit.
    runs = tmp_path / "runs"
    shutil.copytree(ner_run, runs / "run-3", ignore=shutil.ignore_patterns("ray", "best"))
    status = json.loads((runs / "run-3" / "status.json").read_text())
    base = yaml.safe_load(Path(status["recipe"]).read_text())
    base["train"]["lr"] = 0.123
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(base))
    status["recipe"] = str(edited)
    (runs / "run-3" / "status.json").write_text(json.dumps(status))
    # wide: a long tmp path (pytest-xdist's popen-gwN) must not wrap a figure across lines
    res = cli("zeroship", "runs", "show", "3", "--runs", str(runs), env={"COLUMNS": "400"})
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "train.lr" in out and "0.123" in out and str(status["winner"]["value"])[:6] in out
    evals = [json.loads(line) for line in (ner_run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert all(f"{e['eval_f1']:.4f}" in out for e in evals)  # the metric history
    # the unedited original: no differences to show
    same = cli("zeroship", "runs", "show", ner_run.name, "--runs", str(ner_run.parent), env={"COLUMNS": "400"})
    assert same.returncode == 0 and "as it is, no overrides" in same.stdout


def test_mlflow_uri_without_mlflow_is_refused_at_check(monkeypatch):
    from launcher.runs.observe import check_mlflow
    from zeroship.errors import RecipeError

    check_mlflow("/tmp/mlruns")  # installed (the dev extra): accepted
    monkeypatch.setitem(sys.modules, "mlflow", None)  # the one fake: a machine without mlflow
    with pytest.raises(RecipeError, match="pip install mlflow"):
        check_mlflow("/tmp/mlruns")


# ------------------------------------------------------------------ simulated multi-node cluster
@pytest.fixture
def two_nodes(ray_tmp, monkeypatch):
    """Two Ray nodes on this machine, all on loopback, with their own temp dir: a CPU per node for a
    worker, and one more on the head for Ray Data's tasks (a run leaves one beside its workers)."""
    from ray.cluster_utils import Cluster

    for key, value in {**LOOPBACK_ENV, "RAY_TMPDIR": ray_tmp}.items():
        monkeypatch.setenv(key, value)
    os.makedirs(os.path.join(ray_tmp, "ray"), exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "temp_dir": ray_tmp, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_two_node_run_on_a_storage_uri_and_its_export_from_there(two_nodes, tmp_path):
    """One worker per node (2 workers, SPREAD), ZeRO-2, with run.storage a URI (file:// here; s3:// and gs://
    go through the same pyarrow calls) as a multi-node user's would be: Ray's checkpoints from both nodes,
    status, best/ and TensorBoard land at the URI; an export on a machine whose cache never saw the run
    pulls it from there and pushes the bundle back. The training data is a URI too: a glob of JSONL
    shards, which Ray Data's tasks read through pyarrow. Then `--check` with a local storage folder finds
    it visible from both nodes. One launch for the cluster and the URI (~100 CPU-s less than one each)."""
    from export.runtime import Predictor

    bucket = tmp_path / "bucket"
    uri = f"file://{bucket}/runs"
    toy_ner_shards(bucket / "train", "jsonl", 3)
    toy_ner_shards(bucket / "validation", "jsonl", 1, split="validation")
    recipe = tiny_ner_recipe(tmp_path, run={"storage": uri}, scaling={"workers": 2, "placement_strategy": "SPREAD"},
                             data={"format": "jsonl", "train": f"file://{bucket}/train/part-*.jsonl",
                                   "validation": f"file://{bucket}/validation"})
    started = time.time()
    res = cli("launch", str(recipe), env={"RAY_ADDRESS": two_nodes.address, "ZEROSHIP_CACHE": str(tmp_path / "c1"),
                                          "COLUMNS": "400"})  # rich folds a URI longer than the line
    wall = time.time() - started
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "cluster at" in out  # joined the 2-node cluster, started no Ray of its own
    assert f"--runs {uri}" in " ".join(out.split())
    print(f"2-node run wall time: {wall:.0f} s")
    remote = bucket / "runs" / "run-1"
    status = json.loads((remote / "status.json").read_text())
    assert status["state"] == "succeeded" and status["data"]["train"]["examples"] == 600  # every shard, once
    assert {"model.safetensors", "model.json", "metrics.json", "report.json", "tokenizer.json"} <= {
        p.name for p in (remote / "best").iterdir()}  # the shards of both nodes met in best/
    assert list((remote / "ray" / "train").glob("checkpoint_*")), "Ray Train did not write to the URI"
    assert list((remote / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert not (tmp_path / "runs").exists()

    res = cli("zeroship", "export", "onnx", "latest", "--runs", uri, env={"ZEROSHIP_CACHE": str(tmp_path / "c2")})
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    bundle = remote / "onnx"
    ents = Predictor.load(bundle).predict("Mara Okafor joined Kestrel Systems in Port Selwyn .")
    assert {e["label"] for e in ents} <= {"PER", "ORG", "LOC", "MISC"}
    listed = cli("zeroship", "runs", "--runs", uri, env={"ZEROSHIP_CACHE": str(tmp_path / "c3"), "COLUMNS": "400"})
    assert listed.returncode == 0 and "run-1" in listed.stdout and "succeeded" in listed.stdout

    # --check against the cluster: joins it, and finds a local storage folder visible from both nodes
    local = tmp_path / "runs"
    check = cli("launch", str(recipe), "--check", f"run.storage={local}", env={"RAY_ADDRESS": two_nodes.address})
    assert check.returncode == 0, check.stderr[-3000:]
    assert "cluster OK" in check.stdout and "2 node(s)" in check.stdout
    assert not list(local.glob(".zeroship-shared-check-*"))  # its marker is cleaned up


def test_storage_one_node_cannot_see_is_refused(tmp_path):
    """The refusal logic, with the cluster faked: node B's probe does not find the marker."""
    from launcher.driver.cluster import ClusterError, check_shared_storage

    nodes = [{"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1"},
             {"NodeID": "b" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.2"},
             {"NodeID": "c" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.3"}]
    seen: list = []

    def probe(node_ids, path, token):
        seen.append((node_ids, Path(path).read_text() == token))  # the marker exists while probed
        return [True, False]

    with pytest.raises(ClusterError) as err:
        check_shared_storage(tmp_path / "runs", nodes=nodes, probe=probe)
    text = str(err.value.problems[0])
    assert "1 of the cluster's 2 nodes cannot see it (10.0.0.2)" in text and "/mnt/shared" in text
    assert seen == [(["a" * 56, "b" * 56], True)]  # dead nodes are not asked
    assert not list((tmp_path / "runs").glob(".zeroship-shared-check-*"))
    assert check_shared_storage(tmp_path / "runs", nodes=nodes, probe=lambda *a: [True, True]) == 2
    assert check_shared_storage(tmp_path / "runs", nodes=nodes[:1]) == 1  # one node: nothing to check


# ------------------------------------------------------------------ ray job submit
def test_ray_job_submit_and_its_exit_code(quickstart_job, plain_ner_bundle):
    """`ray job submit --working-dir . -- launch recipes/quickstart_ner.yaml` against a head started on
    loopback (conftest.quickstart_job); the run exports from the checkout after Ray deleted the job's copy
    of it (conftest.plain_ner_bundle); a recipe that cannot run makes the job, and `ray job submit`, fail."""
    job = quickstart_job
    out = job.good.stdout + job.good.stderr
    assert job.good.returncode == 0, out[-4000:]
    run = job.runs / "run-1"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "succeeded"
    # README's word for the recipe as it ships (2 epochs): validation F1 near 1.0 (1.0 measured, seeds 42 and 7)
    assert status["winner"]["metric"] == "eval_f1" and status["winner"]["value"] >= 0.95, status["winner"]
    assert {"recipe.yaml", "metrics.jsonl", "best", "tensorboard"} <= {p.name for p in run.iterdir()}
    assert (run / "best" / "model.safetensors").is_file()
    assert "cluster at" in out  # it joined the test's cluster instead of starting its own
    assert "zeroship export onnx run-1" in out  # and says how to export the result
    print(f"job submit wall time: {job.good_wall_s:.0f} s")
    # the recipe's data paths were the job's copy of the checkout, gone with the job: the export read
    # the same files in the checkout it ran in, and said so
    assert "_ray_pkg_" in status["cwd"] and not Path(status["cwd"]).exists()
    said = (job.runs.parent / "export.txt").read_text()
    for split in ("train", "validation", "test"):
        assert f"data.{split}: " in said and f"reading ./recipes/data/toy_ner/{split}.conll instead" in said
    assert json.loads((plain_ner_bundle / "manifest.json").read_text())["metrics"]

    out = job.bad.stdout + job.bad.stderr
    assert job.bad.returncode != 0, out[-3000:]
    assert "64 workers" in out and "failed with exit code 2" in out  # launch's user-error code
    assert json.loads((job.runs / "run-2" / "status.json").read_text())["state"] == "failed"
