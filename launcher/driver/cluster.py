"""Joining Ray for a launch and checking the cluster can run the recipe: resources, shared storage
for checkpoints (probed on every node), the checkpoint signing key passed to the workers."""

from __future__ import annotations

import os
from pathlib import Path

from launcher.driver.plan import local_cpus, resource_problems
from launcher.recipe.schema import Recipe
from launcher.runs.storage import is_uri
from launcher.worker.signing import KEY_ENV, load_key
from zeroship.errors import Problem, ZeroshipError


class ClusterError(ZeroshipError):
    """The Ray cluster cannot run this recipe."""


# ------------------------------------------------------------------ Ray
def connect_ray(recipe: Recipe, storage: str | None = None, log_to_driver: bool = True) -> str:
    """Join the cluster when one is there, else start a local Ray bound to loopback
    (zeroship.ray_session), then check it can run the recipe. Returns a short description."""
    from zeroship.ray_session import init_ray

    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if os.environ.get("ZEROSHIP_FAULT"):  # test-only fault hook (launcher.worker.loop_state.FaultHook)
        env["ZEROSHIP_FAULT"] = os.environ["ZEROSHIP_FAULT"]
    env[KEY_ENV] = load_key().hex()  # workers sign their checkpoints with it (launcher.worker.signing)
    if not os.environ.get("RAY_ADDRESS"):
        _check_local_cpus(recipe)  # before a Ray that could not hold the run is started (~8 s) for nothing
    # a sweep that stops trials early (ASHA) gets the dashboard that Ray Train's placement-group cleaner
    # needs (launcher.driver.trainer.trainer_class); every other run, k-fold and plain grids included, is lean
    where = init_ray(env, log_to_driver, dashboard=stops_trials_early(recipe))
    if where == "existing ray session":
        return where
    _check_resources(recipe)
    if storage and not is_uri(storage):  # a URI is reachable from every node by construction
        check_shared_storage(Path(storage))
    return where


def stops_trials_early(recipe: Recipe) -> bool:
    """Whether Tune may kill a trial while it trains (a scheduler prunes it): only then can a trial's
    placement group outlive its controller, and the run needs Ray Train's cleaner."""
    return recipe.sweep is not None and recipe.sweep.scheduler != "none"


def check_shared_storage(root: Path, nodes: list[dict] | None = None, probe=None) -> int:
    """On a cluster of more than one node every node must see run.storage: workers write their
    checkpoint shards there and the driver merges them. A marker file written here is looked for by
    a task pinned to each node; returns the number of nodes checked. `nodes` (ray.nodes() rows) and
    `probe(node_ids, path, token) -> [seen]` are for tests (default: the cluster, a task per node)."""
    import uuid

    import ray

    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    if len(nodes) <= 1:
        return len(nodes)
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = (root / f".zeroship-shared-check-{token}").resolve()
    marker.write_text(token)
    try:
        results = (probe or _probe_on_node)([n["NodeID"] for n in nodes], str(marker), token)
    finally:
        marker.unlink(missing_ok=True)
    blind = [n.get("NodeManagerAddress", n["NodeID"][:8]) for n, seen in zip(nodes, results) if not seen]
    if blind:
        raise ClusterError(Problem(
            "run.storage", f"{root} is not shared: {len(blind)} of the cluster's {len(nodes)} nodes cannot see it "
            f"({', '.join(blind[:4])}); workers on those nodes would write checkpoints the driver never sees",
            "put runs on storage every node mounts (an NFS/EFS path such as /mnt/shared/zeroship/runs, see "
            "cluster/aws-gpu.yaml) and set run.storage (or --runs) to it"))
    return len(nodes)


def _probe_on_node(node_ids: list[str], path: str, token: str) -> list[bool]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def sees(path: str, token: str) -> bool:
        try:
            return Path(path).read_text() == token
        except OSError:
            return False

    refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(path, token)
            for node in node_ids]
    return ray.get(refs, timeout=120)


def _check_local_cpus(recipe: Recipe) -> None:
    """A local Ray declares this machine's CPUs and one more (zeroship.ray_session): its CPU count is known
    before it starts. Its GPUs are Ray's to detect (the driver imports no torch), so `_check_resources`
    judges them once it runs."""
    import ray

    if ray.is_initialized():
        return
    have = {"CPU": local_cpus(), "GPU": float("inf")}  # GPUs: not judged here
    problems = resource_problems(recipe, have, "this machine")
    if problems:
        raise ClusterError(problems)


def _check_resources(recipe: Recipe) -> None:
    import ray

    problems = resource_problems(recipe, ray.cluster_resources(), "the cluster")
    if problems:
        raise ClusterError(problems)
