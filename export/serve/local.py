"""`zeroship serve` on one box: export.serve.service's routes on uvicorn in this process, no Ray.

The model runs on one worker thread, fed by `LocalBatcher`: a text waits only while the model is busy
with earlier ones, and each call takes every text queued meanwhile (up to `max_batch_size`). At one
client that is one text per call with no wait added; under load the batch grows by itself, which is
what dynamic batchers built for this (text-embeddings-inference, Triton's) do. More than `max_queue`
texts waiting: 503 with Retry-After, counted in /stats, instead of latency without bound.

Quiet by default: the console shows the URL, the routes, the model and errors; one line per request
goes to `--access-log FILE` (or the console with -v), with the request id a 500's body carries.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections import deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from export.serve.service import BundleService, Overloaded, ServeError, ServeOptions, predict_isolated

ACCESS_LOG_HEADER = "# zeroship serve access log: time request_id client method path status ms\n"


class LocalBatcher:
    """Texts from every request in one queue, predicted in batches on one thread (onnxruntime uses the
    replica's threads inside each call). Results come back to each request in its own order."""

    def __init__(self, service: BundleService):
        self.service = service
        self.queue: deque[tuple[str, asyncio.Future]] = deque()
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, texts: list[str]) -> list[Any]:
        limit = self.service.opts.max_queue
        if len(self.queue) + len(texts) > limit:
            raise Overloaded(f"{len(self.queue)} texts are waiting (limit {limit}); retry shortly")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in texts]
        self.queue.extend(zip(texts, futures))
        assert self.wake is not None
        self.wake.set()
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        assert self.wake is not None
        opts, counts = self.service.opts, self.service.counts
        while True:
            await self.wake.wait()
            if not self.queue:
                self.wake.clear()
                continue
            batch = [self.queue.popleft() for _ in range(min(len(self.queue), opts.max_batch_size))]
            counts["model_calls"] += 1
            counts["texts"] += len(batch)
            texts = [text for text, _ in batch]
            try:
                results = await asyncio.to_thread(predict_isolated, self.service.predictor.predict, texts,
                                                  opts.max_batch_size)
            except Exception as exc:  # predict_isolated catches the model's errors; this is anything else
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():  # a client that went away cancelled its future
                    future.set_result(result)


class LocalService(BundleService):
    def __init__(self, options: dict):
        self.load(options)
        self.batcher = LocalBatcher(self)

    async def submit(self, texts: list[str]) -> list[Any]:
        return await self.batcher.submit(texts)

    def stats(self) -> dict:
        return {**super().stats(), "queue_depth": len(self.batcher.queue), "queue_limit": self.opts.max_queue}


def build_local_app(service: LocalService, access: logging.Logger | None = None) -> FastAPI:
    """The FastAPI app of the local runner: the same routes as export.serve.ray_serve.BundleServer's."""
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.batcher.start()  # on uvicorn's event loop
        yield

    app = FastAPI(title="zeroship", description="Predictions from an exported zeroship bundle.", lifespan=lifespan)

    if access is not None:
        @app.middleware("http")
        async def access_log(request: Request, call_next):
            start = time.perf_counter()
            request_id = request.state.request_id = uuid.uuid4().hex[:12]  # a 500's body carries it too
            response = await call_next(request)
            client = request.client.host if request.client else "-"
            access.info("%s %s %s %s %s %d %.1f", time.strftime("%Y-%m-%dT%H:%M:%S"), request_id, client,
                        request.method, request.url.path, response.status_code,
                        (time.perf_counter() - start) * 1000)
            return response

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        return await service.handle_predict(await request.body(), getattr(request.state, "request_id", None))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return service.readyz()

    @app.get("/metadata")
    async def metadata() -> dict:
        return service.metadata()

    @app.get("/stats")
    async def stats() -> dict:
        return service.stats()

    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a clear error before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _server_class():
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGINT/SIGTERM end it with exit 0: uvicorn re-raises the signal
        once it has shut down, which would end the command as killed (SIGTERM) or interrupted (130)."""

        @contextlib.contextmanager
        def capture_signals(self):
            def stop(*_):
                self.force_exit = self.should_exit  # a second signal: stop waiting for open requests
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def run_local(opts: ServeOptions, host: str, port: int, say, access: logging.Logger | None = None) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers: in-flight requests finish, exit 0)."""
    import uvicorn

    from zeroship.errors import Problem

    errors = logging.getLogger(BundleService.log.name)  # a 500's traceback, with its request id, on the console
    if not errors.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        errors.addHandler(handler)
    service = LocalService(opts.model_dump())
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise ServeError(Problem(f"--host {host} --port {port}", f"cannot listen there ({exc.strerror})",
                                    "pick a free port, e.g. --port 8001")) from None
    config = uvicorn.Config(build_local_app(service, access), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10, lifespan="on")
    server = _server_class()(config)
    url = f"http://{host}:{port}"
    on = "on CUDA, " if service.provider == "CUDAExecutionProvider" else ""
    say(f"serving {opts.bundle} ({service.predictor.variant}, {on}{opts.threads_per_replica} threads) in this "
        f"process: {url}")
    say(f"  POST {url}/predict  GET {url}/healthz {url}/readyz {url}/metadata {url}/stats  docs: {url}/docs")
    say("  Ctrl-C stops it")
    server.run(sockets=[sock])
    say("shutting down")
    return 0
