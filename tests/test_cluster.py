"""cluster/: the files parse and carry what Ray expects; local.sh starts and stops only its own Ray."""

from __future__ import annotations

import os
import subprocess
import time
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


def test_large_recipe_uses_the_shared_mount():
    recipe = yaml.safe_load((ROOT / "recipes/large_ner.yaml").read_text())
    assert recipe["run"]["storage"].startswith("/mnt/shared/")


def test_local_cluster_up_and_down(tmp_path):
    state = Path("/tmp") / f"zs-cl-{os.getpid()}"  # short: Ray's socket paths have a length limit
    env = {**os.environ, "ZEROSHIP_CLUSTER_DIR": str(state), "RAY": str(Path(os.sys.executable).parent / "ray")}
    try:
        up = subprocess.run(["bash", str(ROOT / "cluster/local.sh"), "up"], env=env, capture_output=True,
                            text=True, timeout=180)
        assert up.returncode == 0, up.stderr
        address = (state / "address").read_text().strip()
        assert address.startswith("http://127.0.0.1:") and "ray job submit --address" in up.stdout
        with urllib.request.urlopen(f"{address}/api/version", timeout=10) as resp:
            assert resp.status == 200
        pid = int((state / "head.pid").read_text())
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
