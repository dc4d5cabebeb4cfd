"""`coserve serve`: build the engine, run uvicorn, drain on SIGTERM.

On SIGTERM (or SIGINT) readiness turns 503 at once, new work is refused, in-flight
requests get `shutdown_timeout` seconds to finish, the rest end with
finish_reason "abort", then the server exits. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import uvicorn

from coserve.engine.async_engine import AsyncEngine
from coserve.engine.demo import write_demo_model
from coserve.engine.engine import LLMEngine
from coserve.server.app import create_app
from coserve.settings import ServeSettings

log = logging.getLogger("coserve.server")


def resolve_model(settings: ServeSettings) -> str:
    """The --model directory, or demo-small generated once into the data directory."""
    if settings.model:
        return settings.model
    path = Path(settings.data_dir) / "models" / "demo-small"
    if not (path / "model.safetensors").is_file():
        log.info("no --model given: generating the demo-small checkpoint into %s (once)", path)
        write_demo_model("small", path)
    return str(path)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, shutdown_timeout: float):
        super().__init__(config)
        self.app = app
        self.shutdown_timeout = shutdown_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # second signal: leave now
            return super().handle_exit(sig, frame)
        self._draining = True
        log.info("signal %s: draining (readiness 503, up to %.0fs for in-flight requests)", sig,
                 self.shutdown_timeout)
        asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        st = self.app.state.coserve
        st.draining = True
        deadline = time.monotonic() + self.shutdown_timeout
        while st.engine.num_active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if st.engine.num_active:
            log.info("drain timeout: aborting %d requests", st.engine.num_active)
            st.engine.abort_all()
            for _ in range(100):  # let the aborted responses flush
                if not st.engine.num_active:
                    break
                await asyncio.sleep(0.02)
        self.should_exit = True


def serve(settings: ServeSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = resolve_model(settings)
    engine = LLMEngine(settings.engine_config(model_dir))
    info, q = engine.info, engine.info.quantize
    log.info("loaded %s (%s, %d layers, dtype %s)", model_dir, engine.model.config.model_type,
             engine.model.config.num_hidden_layers, info.dtype)
    log.info("quantization: %s (%d linears quantized, %d kept; %.1f MiB of linear weights)",
             q.mode, q.num_quantized, q.num_kept, q.linear_bytes / 2**20)
    log.info("KV cache: %d blocks of %d tokens (%.1f MiB); context window %d tokens",
             info.kv.num_blocks, info.kv.block_size, info.kv.num_blocks * info.kv.bytes_per_block / 2**20,
             info.max_model_len)
    server_config = settings.server_config(model_dir)
    app = create_app(AsyncEngine(engine), server_config)
    uv_config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                               timeout_graceful_shutdown=5)
    server = DrainingServer(uv_config, app, settings.shutdown_timeout)
    log.info("serving model %r at http://%s:%d/v1", server_config.served_model_name, settings.host, settings.port)
    server.run()
