"""What the routes share: the engine, tokenizer, limits, metrics and lifecycle flags."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from coserve.engine.async_engine import AsyncEngine
from coserve.engine.tokenizer import ModelTokenizer
from coserve.server.metrics import Metrics
from coserve.settings import ServerConfig


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

    def resolve_model(self, name: str) -> str | None:
        """The request's `model`: None for the base model, else the adapter it names (404 if unknown)."""
        if name == self.config.served_model_name:
            return None
        if self.engine.engine.adapters.known(name):
            return name
        raise ApiError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    def check_accepting(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "service_unavailable", headers={"Retry-After": "5"})
        if not self.engine.alive:
            raise ApiError(503, f"the engine is not running: {self.engine.dead_reason}", "service_unavailable")
        waiting = self.engine.num_active - self.engine.num_running
        if waiting >= self.config.max_queued_requests:
            raise ApiError(503, f"too many queued requests ({waiting}); retry later", "service_unavailable",
                           headers={"Retry-After": "1"})
