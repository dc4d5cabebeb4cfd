"""What the routes share: the engine, tokenizer, limits, metrics and lifecycle flags."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import Request

from coserve.adapters.ingest import record_source
from coserve.adapters.registry import AdapterSource, LoadTiming
from coserve.adapters.store import AdapterRecord, AdapterStore
from coserve.engine.async_engine import AsyncEngine
from coserve.engine.tokenizer import ModelTokenizer
from coserve.server.auth import KeyRing, Principal, RateLimiter, retry_after_header
from coserve.server.finetune.records import FineTuneStore
from coserve.server.metrics import Metrics
from coserve.settings import ADAPTER_NAME, ServerConfig


class ApiError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: ModelTokenizer
    config: ServerConfig
    metrics: Metrics
    max_model_len: int
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False  # model loaded and a real generation succeeded
    draining: bool = False  # SIGTERM received: refuse new work, finish in-flight
    loop: asyncio.AbstractEventLoop | None = None  # the server's event loop (set at start-up)
    store: AdapterStore | None = None  # the Redis adapter store (None: only --adapter / runtime-loaded ones)
    keys: KeyRing = field(default_factory=KeyRing)
    limiter: RateLimiter | None = None
    shared_adapters: set[str] = field(default_factory=set)  # --adapter and load_lora_adapter: every tenant's
    finetune: FineTuneStore | None = None  # files, jobs and the job queue (with the store)

    @property
    def fingerprint(self) -> str:
        return self.engine.engine.info.fingerprint

    async def resolve_model(self, principal: Principal, name: str) -> tuple[str | None, AdapterSource | None]:
        """The request's `model` -> (engine adapter id, its source if the engine may not know it yet).
        None for the base model. The caller's own stored adapters come first, then the shared ones;
        another tenant's adapter is as missing as one that does not exist (404)."""
        if name == self.config.served_model_name:
            return None, None
        if self.store is not None and ADAPTER_NAME.match(name):
            record = await asyncio.to_thread(self.store.get, principal.tenant, name)
            if record is not None:
                if record.base_fingerprint != self.fingerprint:
                    raise ApiError(400, f"adapter `{name}` was made for another base model (fingerprint "
                                   f"{record.base_fingerprint}, this server's is {self.fingerprint})",
                                   param="model")
                return engine_adapter_id(record), self.adapter_source(record)
        if name in self.shared_adapters:
            return name, None
        raise ApiError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    def adapter_source(self, record: AdapterRecord) -> AdapterSource:
        runtime = self.engine.engine.adapters
        key = engine_adapter_id(record)

        def on_fetch(seconds: float) -> None:
            self.metrics.on_adapter_load(LoadTiming(key, "store", seconds))

        return record_source(self.store, record, runtime.shape, runtime.max_rank, on_fetch)

    def check_accepting(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "service_unavailable", headers={"Retry-After": "5"})
        if not self.engine.alive:
            raise ApiError(503, f"the engine is not running: {self.engine.dead_reason}", "service_unavailable")
        waiting = self.engine.num_active - self.engine.num_running
        if waiting >= self.config.max_queued_requests:
            raise ApiError(503, f"too many queued requests ({waiting}); retry later", "service_unavailable",
                           headers={"Retry-After": "1"})


def server_state(request: Request) -> ServerState:
    """The app's ServerState (what every route works with)."""
    return request.app.state.coserve


def engine_adapter_id(record: AdapterRecord) -> str:
    """A stored revision's id inside the engine: a new version is a new id, so requests running on the
    old one finish on it while new requests load the new one."""
    return f"{record.tenant}/{record.name}#{record.revision}"


def store_adapter_prefix(tenant: str, name: str) -> str:
    return f"{tenant}/{name}#"


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


async def authorize(request: Request) -> None:
    """Every /v1 route: the caller's key -> request.state.principal (401 if unknown or revoked), then
    the tenant's rate limit (429 + Retry-After; each tenant has its own bucket)."""
    st: ServerState = request.app.state.coserve
    principal = st.keys.lookup(bearer_key(request))
    if principal is None:
        raise ApiError(401, "invalid or missing API key (send `Authorization: Bearer <key>`)",
                       "authentication_error", headers={"WWW-Authenticate": "Bearer"})
    request.state.principal = principal
    if st.limiter is not None:
        wait = st.limiter.acquire(principal.tenant, principal.rate_limit_rps)
        if wait is not None:
            raise ApiError(429, f"rate limit of tenant {principal.tenant} exceeded; retry in {wait:.2f}s",
                           "rate_limit_error", headers=retry_after_header(wait))


def require_admin(request: Request) -> Principal:
    principal: Principal = request.state.principal
    if not principal.is_admin:
        raise ApiError(403, "this route needs an admin API key", "permission_error")
    return principal
