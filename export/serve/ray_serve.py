"""`zeroship serve`: an exported bundle behind HTTP on Ray Serve.

Each replica holds one `Predictor` (onnxruntime + tokenizers + numpy: no torch, no transformers).
Texts from concurrent requests are batched together by `serve.batch` (up to `max_batch_size` texts
per model call, waiting at most `batch_wait_ms` for more) and the Predictor sorts each batch by
length. Routes (FastAPI, so /docs and /openapi.json come with it):

    POST /predict   {"texts": [...]} → {"model": {run, variant, sha256}, "predictions": [...]}
    GET  /healthz   the replica is alive
    GET  /readyz    the model is loaded and answered a warm-up call (503 until then)
    GET  /metadata  task, labels, variant, device and provider, max length, versions
    GET  /stats     this replica's model calls, texts and requests (how well batching works)

A bad request gets a 4xx with {"error", "detail"} and never reaches the model (a text the tokenizer
cannot take is a 422 naming its index); anything unexpected is a 500 with a request id that the
replica's log repeats next to the traceback. When a batched model call fails, its texts are predicted
one by one, so only the request whose text fails gets the 500.

`zeroship serve` watches its Ray and the application (`run_forever`): when either dies, /readyz turns
503, the command says why and exits 1. Every listener binds the address asked for (the replicas'
inter-deployment gRPC server included: zeroship.ray_compat). With one replica on a Ray started here, the
replica answers on the port itself (Serve's direct ingress, zeroship.ray_compat.direct_ingress_env) and
Serve's proxy listens on a spare port: a request then skips the proxy and the router (~3.5× the requests/s
on 2 cores); with more replicas, or on a cluster, requests go through the proxy.

`build_app(args)` is also the application builder that `serve deploy` imports from a config file
(`zeroship serve --config-only`).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at
# runtime, and under Serve's ingress a string "Request" is taken for a query parameter.
import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from export.serve.service import (  # noqa: F401 - RequestError, parse_texts, predict_isolated: used by tests and callers
    BundleService,
    Overloaded,
    RequestError,
    ServeOptions,
    parse_texts,
    predict_isolated,
)

logger = logging.getLogger("ray.serve")

APP_NAME = "zeroship"


api = FastAPI(title="zeroship", description="Predictions from an exported zeroship bundle.")
@serve.deployment(name="BundleServer", health_check_period_s=5)
@serve.ingress(api)
class BundleServer(BundleService):
    """The bundle on a Ray Serve replica: export.serve.service's routes, texts batched by `serve.batch`."""

    log = logger

    def __init__(self, options: dict):
        from zeroship.ray_compat import bind_replica_grpc_to, reuse_address_for_direct_ingress

        bind_replica_grpc_to(ray.util.get_node_ip_address())  # not every interface (Ray 2.60 binds "[::]")
        reuse_address_for_direct_ingress()  # its port free again as soon as it stops
        self.load(options)
        self._batch.set_max_batch_size(self.opts.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.opts.batch_wait_ms / 1000)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batch(self, texts: list[str]) -> list[Any]:
        """One model call for the texts of every request that arrived within the wait."""
        self.counts["model_calls"] += 1
        self.counts["texts"] += len(texts)
        # the Predictor is CPU-bound: run it off the event loop, so health checks still answer
        return await asyncio.to_thread(predict_isolated, self.predictor.predict, list(texts),
                                       self.opts.max_batch_size)

    async def submit(self, texts: list[str]) -> list[Any]:
        return list(await asyncio.gather(*(self._batch(t) for t in texts)))

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        return await self.handle_predict(await request.body())

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", name="readyz")
    async def readyz_route(self) -> JSONResponse:
        return self.readyz()

    @api.get("/metadata", name="metadata")
    async def metadata_route(self) -> dict:
        return self.metadata()

    @api.get("/stats", name="stats")
    async def stats_route(self) -> dict:
        return self.stats()

    def check_health(self) -> None:  # Serve restarts a replica whose model is gone
        if self.predictor is None:
            raise RuntimeError("no model loaded")


def build_app(args: dict) -> serve.Application:
    """The Serve application for these options (the application builder `serve deploy` calls)."""
    opts = ServeOptions(**args)
    scaling: dict[str, Any] = {"num_replicas": opts.replicas}
    if opts.autoscale is not None:
        lo, hi = opts.autoscale
        scaling = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                          "target_ongoing_requests": 2 * opts.max_batch_size}}
    # beyond max_queue requests waiting at a replica Serve's proxy answers 503 itself (backpressure)
    deployment = BundleServer.options(ray_actor_options=actor_options(opts),
                                      max_ongoing_requests=4 * opts.max_batch_size,
                                      max_queued_requests=opts.max_queue,
                                      logging_config={"enable_access_log": opts.access_log}, **scaling)
    return deployment.bind(opts.model_dump())


def actor_options(opts: ServeOptions) -> dict:
    """What Ray reserves for a replica: its onnxruntime threads' CPUs, and on cuda a whole GPU (Ray sets
    the replica's CUDA_VISIBLE_DEVICES to it, so onnxruntime's device 0 is that GPU)."""
    return {"num_cpus": opts.threads_per_replica, **({"num_gpus": 1} if opts.device == "cuda" else {})}


def config_yaml(opts: ServeOptions, host: str, port: int) -> str:
    """A Ray Serve config file that `serve deploy` runs on an existing cluster (the bundle path must
    be readable on every node: shared storage)."""
    import yaml

    args = opts.model_dump()
    args["bundle"] = str(Path(opts.bundle).resolve())
    if args["autoscale"] is not None:
        args["autoscale"] = list(args["autoscale"])
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": "export.serve.ray_serve:build_app", "args": args}
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


class Watch:
    """What `zeroship serve` checks every second while it serves: the core processes of the private Ray it
    started (their exit is seen at once), and every few seconds the application's status from Serve's
    controller, which must answer within `answer_s`. `problem()` says what died ("" while all is well)."""

    def __init__(self, status=None, answer_s: float = 15.0, status_every_s: float = 5.0,
                 unhealthy_grace_s: float = 60.0):
        self.status = status or serve.status
        self.answer_s, self.status_every_s, self.unhealthy_grace_s = answer_s, status_every_s, unhealthy_grace_s
        self.next_status = 0.0
        self.unhealthy_since: float | None = None

    def problem(self, now: float | None = None) -> str:
        from zeroship.ray_compat import exited_ray_processes

        now = time.monotonic() if now is None else now
        dead = exited_ray_processes()
        if dead:
            return f"Ray stopped: {', '.join(dead)} exited"
        if now < self.next_status:
            return ""
        self.next_status = now + self.status_every_s
        answer = call_with_deadline(self.status, self.answer_s)
        if isinstance(answer, BaseException):
            return f"Ray does not answer: Serve's status failed ({type(answer).__name__}: {str(answer)[:200]})"
        return self.app_problem(answer, now)

    def app_problem(self, status: Any, now: float) -> str:
        """A Serve status → what is wrong with the application ("" when it serves or is starting). A
        replica that dies is replaced by Serve (UNHEALTHY meanwhile), so only a lasting UNHEALTHY counts."""
        app = status.applications.get(APP_NAME)
        if app is None:
            return "the application is gone (deleted from Serve)"
        state = str(getattr(app.status, "value", app.status))
        if state in ("DEPLOY_FAILED", "DELETING"):
            return f"the application is {state}: {str(app.message)[:300]}"
        if state != "UNHEALTHY":
            self.unhealthy_since = None
            return ""
        self.unhealthy_since = self.unhealthy_since if self.unhealthy_since is not None else now
        if now - self.unhealthy_since >= self.unhealthy_grace_s:
            return f"the application has been UNHEALTHY for {self.unhealthy_grace_s:.0f} s: {str(app.message)[:300]}"
        return ""


def call_with_deadline(fn, seconds: float) -> Any:
    """fn()'s result, or the exception it raised, or TimeoutError after `seconds` (the call is left
    running on a daemon thread: a dead Ray's client can block for a minute)."""
    import threading

    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True, name="zeroship-watch")
    thread.start()
    thread.join(seconds)
    return box[0] if box else TimeoutError(f"no answer in {seconds:.0f} s")


def run_forever(opts: ServeOptions, host: str, port: int, say, warn=None, verbose: bool = False) -> int:
    """Start the application on Ray (joined or local), print where, serve until SIGINT/SIGTERM (exit 0)
    or until its Ray or the application dies (exit 1, with the reason; /readyz turns 503 first).
    Ctrl-C at any point after Ray is up, start-up included, shuts Serve down and exits 0."""
    import signal
    import tempfile

    from zeroship.ray_session import init_ray

    def stop(*_):
        raise KeyboardInterrupt

    warn = warn or say
    if not verbose:  # the console shows the URL, routes and errors: not Ray's banners and Serve's start-up
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
    # One replica on a Ray started here: it answers on the port itself (direct ingress) and Serve's
    # proxy, which every request would otherwise cross, listens on a spare port of the same address.
    direct = not os.environ.get("RAY_ADDRESS") and opts.replicas == 1 and opts.autoscale is None
    proxy_port = port
    if direct:
        from zeroship.ray_compat import direct_ingress_env
        from zeroship.ray_session import free_port

        proxy_port = free_port(host)
        os.environ.update(direct_ingress_env(port))  # before Ray starts: its processes inherit them
    where = init_ray(log_to_driver=verbose, logging_level=None if verbose else logging.ERROR)
    local = not where.startswith("cluster")
    # SIGINT too, as the in-process runner (uvicorn) does: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt for it
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failure = ""
    known: dict[int, Any] = {}  # pid → psutil.Process of the private Ray's processes
    ready_dir = tempfile.mkdtemp(prefix="zeroship-serve-") if local else None
    try:
        if ready_dir is not None:  # every replica is on this machine: removing the file drains them
            opts = opts.model_copy(update={"ready_file": os.path.join(ready_dir, "ready")})
            open(opts.ready_file, "w").close()
        serve.start(http_options={"host": host, "port": proxy_port})
        serve.run(build_app(opts.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{host}:{port}"
        say(f"serving {opts.bundle} ({opts.variant}{', a GPU per replica' if opts.device == 'cuda' else ''}) "
            f"on {where}: {url}")
        say(f"  POST {url}/predict  GET {url}/healthz {url}/readyz {url}/metadata {url}/stats  docs: {url}/docs")
        say("  Ctrl-C stops it")
        watch, tick = Watch(), 0
        while not failure:
            if local and tick % 5 == 0:  # the replicas and proxy, kept while their raylet is alive to see them
                known.update({p.pid: p for p in _ray_descendants()})
            time.sleep(1)
            tick += 1
            failure = watch.problem()
    except KeyboardInterrupt:
        say("shutting down")
    finally:  # a second Ctrl-C must not cut the shutdown short (and leave the port taken)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if opts.ready_file is not None and os.path.exists(opts.ready_file):
            os.unlink(opts.ready_file)  # /readyz → 503 while the rest goes down
        if failure:
            warn(f"error: {failure}; stopping (exit 1)")
            time.sleep(2)  # a load balancer polling /readyz sees 503 before the port closes
        _shut_down(local, failed=bool(failure), known=list(known.values()))
        if ready_dir is not None:
            import shutil

            shutil.rmtree(ready_dir, ignore_errors=True)
    if failure:  # Ray's exit hooks would wait for the dead GCS again (up to a minute)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 0


def _shut_down(local: bool, failed: bool, known: list) -> None:
    """Serve and Ray down, each step bounded: after a failure Ray's clients can block for a minute."""
    if not local:
        call_with_deadline(lambda: serve.delete(APP_NAME), 30)  # only this application: others keep serving
    elif not failed:
        call_with_deadline(serve.shutdown, 60)
    # a replica or proxy whose raylet died lives on (listening) until its GCS client gives up after 60 s
    orphans = list({p.pid: p for p in [*known, *_ray_descendants()]}.values()) if local else []
    if failed:
        _end(orphans)  # first: ray.shutdown would wait for the dead GCS
    call_with_deadline(ray.shutdown, 5 if failed else 30)
    _end(orphans)


def _ray_descendants() -> list:
    """This process's descendants (the private Ray's processes, its actors included), as psutil handles."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _end(processes: list) -> None:
    """SIGTERM, then SIGKILL after 5 s, the processes of the private Ray this command started that are
    still alive (psutil checks each is the same process, not a reused pid)."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    for proc in alive:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=5)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
