"""cluster/: the files parse and carry what Ray expects; local.sh starts and stops only its own Ray."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml
from conftest import ROOT


def test_ray_up_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster/aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # raises on any schema violation
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("/mnt/shared" in cmd for cmd in config["setup_commands"])
    broken = yaml.safe_load((ROOT / "cluster/aws-gpu.yaml").read_text())
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0  # a typo the schema must catch
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_kuberay_rayjob_has_the_fields_kuberay_needs():
    job = yaml.safe_load((ROOT / "cluster/kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"] == "launch recipes/large_ner.yaml"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and "rayStartParams" in cluster["headGroupSpec"]
    for group in cluster["workerGroupSpecs"]:
        assert {"groupName", "replicas", "rayStartParams", "template"} <= set(group)
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["volumeMounts"][0]["mountPath"] == "/mnt/shared"


def _containers(node, found=None) -> list[dict]:
    found = [] if found is None else found
    if isinstance(node, dict):
        found += [c for c in node.get("containers", []) if isinstance(c, dict)]
        for value in node.values():
            _containers(value, found)
    elif isinstance(node, list):
        for value in node:
            _containers(value, found)
    return found


@pytest.mark.parametrize("name", ["kuberay-rayjob.yaml", "kuberay-rayservice.yaml"])
def test_every_kuberay_pod_runs_with_token_auth(name):
    containers = _containers(yaml.safe_load((ROOT / "cluster" / name).read_text()))
    assert len(containers) >= 2 + (name == "kuberay-rayjob.yaml")  # head, workers (and the job submitter)
    for container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "zeroship-ray-token", container["name"]


def test_ray_up_cluster_runs_with_token_auth():
    config = yaml.safe_load((ROOT / "cluster/aws-gpu.yaml").read_text())
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"


def test_large_recipe_fits_the_shipped_gpu_cluster_with_cpus_left_for_ray_data():
    """launch's own resource check, against what the RayJob's pods give Ray: the recipe's workers and
    the CPU Ray Data needs beside them (launcher.driver.plan.DATA_CPUS) must fit."""
    from launcher.driver.plan import resource_problems
    from launcher.recipe.schema import load_recipe

    cluster = yaml.safe_load((ROOT / "cluster/kuberay-rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    have = {"CPU": float(cluster["headGroupSpec"]["rayStartParams"]["num-cpus"]), "GPU": 0.0}
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        have["CPU"] += group["replicas"] * float(limits["cpu"])
        have["GPU"] += group["replicas"] * float(limits["nvidia.com/gpu"])
    recipe = load_recipe(ROOT / "recipes/large_ner.yaml", [])
    assert resource_problems(recipe, have, "the RayJob's cluster") == []
    greedy = load_recipe(ROOT / "recipes/large_ner.yaml", ["scaling.cpus_per_worker=8"])  # every CPU
    assert "for reading data" in str(resource_problems(greedy, have, "the RayJob's cluster"))


def test_large_recipe_leaves_each_gpu_node_the_data_cpus_its_gpu_needs():
    """cluster/README.md (Feeding the GPUs): an A10G worker on XLM-R-large consumes at most ~1.8 CPUs of
    tokenization, so on the RayJob's GPU pods 2 CPUs per GPU stay Ray Data's."""
    from launcher.recipe.schema import load_recipe

    cluster = yaml.safe_load((ROOT / "cluster/kuberay-rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    scaling = load_recipe(ROOT / "recipes/large_ner.yaml", []).scaling
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        workers = int(limits["nvidia.com/gpu"]) // scaling.gpus_per_worker
        assert workers >= 1 and float(limits["cpu"]) - workers * scaling.cpus_per_worker >= 2 * workers


def test_large_recipe_uses_the_shared_mount():
    recipe = yaml.safe_load((ROOT / "recipes/large_ner.yaml").read_text())
    assert recipe["run"]["storage"].startswith("/mnt/shared/")


def check_job_api_needs_the_token(address: str, token: str, env: dict) -> None:
    """The head's job-submission API (arbitrary code on the cluster) refuses requests without the token:
    raw HTTP, Ray's own client without a token, and with a wrong one; with the token a job runs."""
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}):
        request = urllib.request.Request(f"{address}/api/jobs/", method="POST", headers=headers,
                                         data=b'{"entrypoint": "touch /tmp/zeroship-unauthenticated-job"}')
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code in (401, 403)  # no token: 401; a wrong one: 403
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
    ray_bin = env["RAY"]
    submit = [ray_bin, "job", "submit", "--address", address, "--", "echo", "hello-from-job"]
    for client in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64}):
        res = subprocess.run(submit, env={**env, **client}, capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and "hello-from-job" not in res.stdout
        assert "Unauthorized" in res.stdout + res.stderr or "authentication" in (res.stdout + res.stderr).lower()
    res = subprocess.run(
        submit,
        env={
            **env,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(Path(env["ZEROSHIP_CLUSTER_DIR"]) / "auth_token"),
        },
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0 and "hello-from-job" in res.stdout, res.stdout + res.stderr
    assert not Path("/tmp/zeroship-unauthenticated-job").exists()


def test_local_cluster_up_and_down(tmp_path):
    state = Path("/tmp") / f"zs-cl-{os.getpid()}"  # short: Ray's socket paths have a length limit
    env = {**os.environ, "ZEROSHIP_CLUSTER_DIR": str(state), "RAY": str(Path(os.sys.executable).parent / "ray")}
    try:
        up = subprocess.run(["bash", str(ROOT / "cluster/local.sh"), "up"], env=env, capture_output=True,
                            text=True, timeout=180)
        assert up.returncode == 0, up.stderr
        address = (state / "address").read_text().strip()
        assert address.startswith("http://127.0.0.1:") and "ray job submit --address" in up.stdout
        pid = int((state / "head.pid").read_text())
        token_file = state / "auth_token"
        assert token_file.stat().st_mode & 0o077 == 0  # readable by its owner only
        token = token_file.read_text().strip()
        check_job_api_needs_the_token(address, token, env)
    finally:
        down = subprocess.run(["bash", str(ROOT / "cluster/local.sh"), "down"], env=env, capture_output=True,
                              text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    status = Path(f"/proc/{pid}/status")
    for _ in range(15):  # a SIGKILLed process takes a moment to become a zombie on a busy machine
        try:
            if "zombie" in status.read_text():
                break
        except FileNotFoundError:
            break
        time.sleep(1)
    assert not status.exists() or "zombie" in status.read_text()  # gone (or only awaiting its reaper)
    for _ in range(30):  # Ray's children can take a few seconds to exit after `down` returns
        leftovers = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.split()
        if not leftovers:
            break
        time.sleep(1)
    assert leftovers == []
