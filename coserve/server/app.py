"""The FastAPI app: middleware (request ids, body cap), errors, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coserve.adapters.store import AdapterStore, StoreUnavailable
from coserve.engine.async_engine import AsyncEngine
from coserve.kernels.threads import use_one_torch_thread
from coserve.scheduler.request import SamplingParams
from coserve.server.adapter_routes import on_store_event
from coserve.server.adapter_routes import router as adapter_router
from coserve.server.auth import KeyRing, RateLimiter
from coserve.server.finetune.records import FineTuneStore
from coserve.server.finetune.routes import router as finetune_router
from coserve.server.finetune.worker import JobWorker, ModelInfo, WorkerConfig
from coserve.server.metrics import Metrics
from coserve.server.openai_routes import router as openai_router
from coserve.server.schemas import error_body
from coserve.server.state import ApiError, ServerState
from coserve.settings import ServerConfig

log = logging.getLogger("coserve.server")


UPLOAD_PATHS = ("/v1/adapters", "/v1/files")


class RequestIdAndBodyLimit:
    """Pure ASGI middleware (keeps streaming and disconnect detection intact):
    tags every response with x-request-id and answers 413 to bodies over the cap
    (uploads have their own, larger cap)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int):
        self.app, self.max_body_bytes, self.max_upload_bytes = app, max_body_bytes, max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        cap = self.max_upload_bytes if scope.get("path") in UPLOAD_PATHS else self.max_body_bytes
        too_large = error_body(f"request body exceeds {cap} bytes", "invalid_request_error", None, 413)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            response = JSONResponse(too_large, status_code=413, headers={"x-request-id": request_id})
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise ApiError(413, too_large["error"]["message"])
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, limited_receive, send_with_id)


def _param_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) if parts else "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.status), exc.status, headers=exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, exc: StoreUnavailable):
        log.warning("%s", exc)
        return JSONResponse(error_body(str(exc), "service_unavailable", None, 503), 503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _param_of(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg')}"
        return JSONResponse(error_body(message, "invalid_request_error", param, 400), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, exc.status_code),
                            exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "internal_error", None, 500), 500)


async def warm_up(st: ServerState) -> None:
    """A real one-token generation; readiness turns true only after it succeeds."""
    prompt = st.tokenizer.encode("Hello") or [0]
    async for out in st.engine.generate(f"warmup-{uuid.uuid4().hex}", prompt, SamplingParams(max_tokens=1)):
        if out.error:
            raise RuntimeError(out.error)
    st.ready = True
    log.info("warm-up generation succeeded; ready")


def create_app(engine: AsyncEngine, config: ServerConfig, external_engine_loop: bool = False,
               store: AdapterStore | None = None, keys: KeyRing | None = None,
               shared_adapters: set[str] | None = None) -> FastAPI:
    """The app around an AsyncEngine that is built but not started. With external_engine_loop the
    caller runs the engine loop itself (in the main thread); otherwise the app starts a thread.
    `store` is the Redis adapter store, `keys` the tenants' API keys (None: open, one tenant),
    `shared_adapters` the names registered in the engine for every tenant (--adapter)."""
    metrics = Metrics(config.served_model_name, engine.engine.config.max_loras)
    engine.engine.stats = metrics
    limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_burst)  # per-key overrides even when 0
    st = ServerState(engine, engine.engine.tokenizer, config, metrics, engine.engine.info.max_model_len,
                     store=store, keys=keys or KeyRing(), limiter=limiter,
                     shared_adapters=set(shared_adapters or ()))
    worker = None
    if store is not None:
        st.finetune = FineTuneStore(store.client, store.prefix)
        if config.fine_tuning:
            worker = job_worker(st)
    stop_events = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.loop = asyncio.get_running_loop()
        # torch work off the engine thread (uploads validated in to_thread, and this loop's own thread) stays
        # on one core per thread: an OpenMP team per thread slows the engine's ops (see kernels/threads.py)
        use_one_torch_thread()
        st.loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="coserve-io",
                                                        initializer=use_one_torch_thread))
        if not engine.started and not external_engine_loop:
            engine.start()
        for _ in range(600):  # an external loop (coserve serve's main thread) may still be starting
            if engine.alive:
                break
            await asyncio.sleep(0.05)
        if store is not None:
            store.listen(lambda event: on_store_event(st, event), stop_events)
        await warm_up(st)
        if worker is not None:
            worker.start()
        yield
        if worker is not None:
            worker.stop()
        stop_events.set()
        st.draining = True
        engine.abort_all()
        await asyncio.sleep(0.05)
        engine.stop()

    app = FastAPI(title="coserve", lifespan=lifespan)
    app.state.coserve = st
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(adapter_router)
    app.include_router(finetune_router)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "dead", "reason": engine.dead_reason}, 503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if st.draining:
            return JSONResponse({"status": "draining"}, 503)
        if not st.ready or not engine.alive:
            return JSONResponse({"status": "starting" if engine.alive else "dead"}, 503)
        if store is not None and not await _store_answers(store):
            return JSONResponse({"status": "store unavailable"}, 503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics_endpoint():
        runtime = engine.engine.adapters
        metrics.set_resident(runtime.host.num_cached, len(runtime.slots.slot_of))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(RequestIdAndBodyLimit, max_body_bytes=config.max_body_bytes,
                       max_upload_bytes=config.max_upload_bytes)
    return app


def job_worker(st: ServerState) -> JobWorker:
    runtime, engine, config = st.engine.engine.adapters, st.engine.engine, st.config
    tok = engine.tokenizer
    eos = tok.tokenizer.token_to_id(tok.eos_token) if tok.eos_token else min(engine.eos_token_ids, default=None)
    model = ModelInfo(config.served_model_name, st.fingerprint, runtime.shape, runtime.max_rank, st.max_model_len,
                      eos)
    worker_config = WorkerConfig(config.job_claim_idle_s, config.job_max_deliveries, config.train_microbatch_tokens)
    return JobWorker(st.finetune, st.store, st.engine, st.tokenizer, model, worker_config)


async def _store_answers(store: AdapterStore, timeout_s: float = 2.0) -> bool:
    try:
        return await asyncio.wait_for(asyncio.to_thread(store.ping), timeout_s)
    except asyncio.TimeoutError:
        return False
