"""`zeroship serve`: an exported bundle behind HTTP on Ray Serve.

Each replica holds one `Predictor` (onnxruntime + tokenizers + numpy: no torch, no transformers).
Texts from concurrent requests are batched together by `serve.batch` (up to `max_batch_size` texts
per model call, waiting at most `batch_wait_ms` for more) and the Predictor sorts each batch by
length. Routes (FastAPI, so /docs and /openapi.json come with it):

    POST /predict   {"texts": [...]} → {"model": {run, variant, sha256}, "predictions": [...]}
    GET  /healthz   the replica is alive
    GET  /readyz    the model is loaded and answered a warm-up call (503 until then)
    GET  /metadata  task, labels, variant, max length, versions (from the bundle's manifest)
    GET  /stats     this replica's model calls, texts and requests (how well batching works)

A bad request gets a 4xx with {"error", "detail"} and never reaches the model (a text the tokenizer
cannot take is a 422 naming its index); anything unexpected is a 500 with a request id that the
replica's log repeats next to the traceback. When a batched model call fails, its texts are predicted
one by one, so only the request whose text fails gets the 500.

`zeroship serve` watches its Ray and the application (`run_forever`): when either dies, /readyz turns
503, the command says why and exits 1. Every listener binds the address asked for (the replicas'
inter-deployment gRPC server included: launcher.ray_compat).

`build_app(args)` is also the application builder that `serve deploy` imports from a config file
(`zeroship serve --config-only`).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at
# runtime, and under Serve's ingress a string "Request" is taken for a query parameter.
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator
from ray import serve

from export.runtime import VARIANT_FILES, Predictor, TextError, text_problem

logger = logging.getLogger("ray.serve")

APP_NAME = "zeroship"


class ServeOptions(BaseModel):
    """Everything a replica needs; also the `args` of the Serve config file."""

    bundle: str
    variant: str = "auto"
    threads_per_replica: int = Field(1, ge=1, le=256)
    replicas: int = Field(1, ge=1, le=1024)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled on ongoing requests
    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_wait_ms: float = Field(5.0, ge=0, le=10_000)
    max_texts: int = Field(256, ge=1, le=100_000)  # texts per request
    max_chars: int = Field(20_000, ge=1, le=10_000_000)  # characters per text
    ready_file: str | None = None  # set by run_forever on a private Ray: /readyz is 503 once it is gone

    @model_validator(mode="after")
    def _autoscale_range(self) -> "ServeOptions":
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] >= 1:
            raise ValueError(f"autoscale: need 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale}")
        return self


class RequestError(Exception):
    def __init__(self, status: int, error: str, detail: Any):
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def parse_texts(body: bytes, max_texts: int, max_chars: int) -> list[str]:
    """The texts of a /predict body, or a RequestError that says what is wrong with it."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, not UTF-8, an integer past 4300 digits
        raise RequestError(400, "malformed JSON", str(exc).split(";")[0][:200]) from None
    if not isinstance(payload, dict):
        raise RequestError(422, "expected a JSON object", 'send {"texts": ["...", ...]}')
    extra = sorted(set(payload) - {"texts"})
    if extra:
        raise RequestError(422, "unknown fields", {"fields": extra[:10], "allowed": ["texts"]})
    texts = payload.get("texts")
    if not isinstance(texts, list):
        raise RequestError(422, "texts must be a list of strings", 'send {"texts": ["...", ...]}')
    if not texts:
        raise RequestError(422, "texts is empty", "send at least one text")
    if len(texts) > max_texts:
        raise RequestError(413, "too many texts", {"got": len(texts), "limit": max_texts})
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(422, "texts must be a list of strings", {"index": i, "got": type(text).__name__})
        if len(text) > max_chars:
            raise RequestError(413, "text too long", {"index": i, "chars": len(text), "limit": max_chars})
        problem = text_problem(text)
        if problem:  # a lone surrogate ("\\ud800" is legal JSON) would fail the tokenizer for the whole batch
            raise RequestError(422, "invalid text", {"index": i, "problem": problem})
    return texts


def predict_isolated(predict, texts: list[str], batch_size: int) -> list[Any]:
    """`predict(texts)`, one result per text; when the batched call fails, each text is predicted on its
    own and a text that still fails gets its exception in place of a result, so texts batched together
    from other requests are still answered."""
    try:
        return predict(texts, batch_size)
    except Exception:
        results: list[Any] = []
        for text in texts:
            try:
                results.append(predict([text], batch_size)[0])
            except Exception as exc:
                results.append(exc)
        return results


def error_response(status: int, error: str, detail: Any) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


api = FastAPI(title="zeroship", description="Predictions from an exported zeroship bundle.")


@serve.deployment(name="BundleServer", health_check_period_s=5)
@serve.ingress(api)
class BundleServer:
    def __init__(self, options: dict):
        self.opts = ServeOptions(**options)
        from launcher.ray_compat import bind_replica_grpc_to

        bind_replica_grpc_to(ray.util.get_node_ip_address())  # not every interface (Ray 2.60 binds "[::]")
        self.predictor = Predictor.load(self.opts.bundle, variant=self.opts.variant,
                                        threads=self.opts.threads_per_replica)
        manifest = self.predictor.manifest
        model_file = VARIANT_FILES[self.predictor.variant]
        self.model_info = {"run": manifest.get("run"), "variant": self.predictor.variant,
                           "sha256": manifest["files"][model_file]["sha256"]}
        self._batch.set_max_batch_size(self.opts.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.opts.batch_wait_ms / 1000)
        self.counts = {"model_calls": 0, "texts": 0, "requests": 0}
        self.predictor.predict(["warm up"])  # /readyz answers only once the model has answered
        self.ready = True

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batch(self, texts: list[str]) -> list[Any]:
        """One model call for the texts of every request that arrived within the wait."""
        self.counts["model_calls"] += 1
        self.counts["texts"] += len(texts)
        # the Predictor is CPU-bound: run it off the event loop, so health checks still answer
        return await asyncio.to_thread(predict_isolated, self.predictor.predict, list(texts),
                                       self.opts.max_batch_size)

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        try:
            texts = parse_texts(await request.body(), self.opts.max_texts, self.opts.max_chars)
            self.counts["requests"] += 1
            predictions = await asyncio.gather(*(self._batch(t) for t in texts))
            failed = next((p for p in predictions if isinstance(p, Exception)), None)
            if failed is not None:
                raise failed
            return JSONResponse({"model": self.model_info, "predictions": predictions})
        except RequestError as exc:
            return error_response(exc.status, exc.error, exc.detail)
        except TextError as exc:
            return error_response(422, "invalid text", {"index": exc.index, "problem": exc.problems[0].what})
        except Exception:
            request_id = uuid.uuid4().hex[:12]
            logger.exception("request %s failed", request_id)
            return error_response(500, "internal error", {"request_id": request_id})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        if not getattr(self, "ready", False):
            return error_response(503, "not ready", "the model is still loading")
        if self.opts.ready_file is not None and not os.path.exists(self.opts.ready_file):
            return error_response(503, "not ready", "the server is stopping")
        return JSONResponse({"status": "ready", "model": self.model_info})

    @api.get("/metadata")
    async def metadata(self) -> dict:
        m = self.predictor.manifest
        return {"model": self.model_info, "task": m["task"], "labels": m["labels"], "metric": m.get("metric"),
                "max_length": m["max_length"], "stride": m["stride"], "versions": m.get("versions", {}),
                "limits": {"max_texts": self.opts.max_texts, "max_chars": self.opts.max_chars},
                "batching": {"max_batch_size": self.opts.max_batch_size, "batch_wait_ms": self.opts.batch_wait_ms}}

    @api.get("/stats")
    async def stats(self) -> dict:
        calls = self.counts["model_calls"]
        return {**self.counts, "mean_texts_per_call": self.counts["texts"] / calls if calls else 0.0}

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
    deployment = BundleServer.options(ray_actor_options={"num_cpus": opts.threads_per_replica},
                                      max_ongoing_requests=4 * opts.max_batch_size, **scaling)
    return deployment.bind(opts.model_dump())


def config_yaml(opts: ServeOptions, host: str, port: int) -> str:
    """A Ray Serve config file that `serve deploy` runs on an existing cluster (the bundle path must
    be readable on every node: shared storage)."""
    import yaml

    args = opts.model_dump()
    args["bundle"] = str(Path(opts.bundle).resolve())
    if args["autoscale"] is not None:
        args["autoscale"] = list(args["autoscale"])
    config = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
              "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "export.serve:build_app",
                                "args": args}]}
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
        from launcher.ray_compat import exited_ray_processes

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


def run_forever(opts: ServeOptions, host: str, port: int, say, warn=None) -> int:
    """Start the application on Ray (joined or local), print where, serve until SIGINT/SIGTERM (exit 0)
    or until its Ray or the application dies (exit 1, with the reason; /readyz turns 503 first).
    Ctrl-C at any point after Ray is up, start-up included, shuts Serve down and exits 0."""
    import signal
    import tempfile

    from launcher.ray_session import init_ray

    def stop(*_):
        raise KeyboardInterrupt

    warn = warn or say
    where = init_ray()
    local = not where.startswith("cluster")
    signal.signal(signal.SIGTERM, stop)
    failure = ""
    known: dict[int, Any] = {}  # pid → psutil.Process of the private Ray's processes
    ready_dir = tempfile.mkdtemp(prefix="zeroship-serve-") if local else None
    try:
        if ready_dir is not None:  # every replica is on this machine: removing the file drains them
            opts = opts.model_copy(update={"ready_file": os.path.join(ready_dir, "ready")})
            open(opts.ready_file, "w").close()
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(opts.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{host}:{port}"
        say(f"serving {opts.bundle} on {where}: {url}")
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
