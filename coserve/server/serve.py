"""`coserve serve`: build the engine, run uvicorn, drain on SIGTERM.

On SIGTERM (or SIGINT) readiness turns 503 at once, new work is refused, in-flight
requests get `shutdown_timeout` seconds to finish, the rest end with
finish_reason "abort", then the server exits. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import uvicorn

from coserve.adapters.embedded_redis import EmbeddedRedis
from coserve.adapters.store import AdapterStore, connect
from coserve.adapters.types import AdapterError
from coserve.engine.async_engine import AsyncEngine
from coserve.engine.demo import write_demo_model
from coserve.engine.engine import LLMEngine
from coserve.server.app import create_app
from coserve.server.auth import OPEN_TENANT, KeyRing, KeysError
from coserve.settings import ServeSettings

log = logging.getLogger("coserve.server")

SWITCH_INTERVAL_S = 0.0005


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
    """uvicorn in a worker thread; the main thread runs the engine loop and forwards signals here."""

    def __init__(self, config: uvicorn.Config, app, shutdown_timeout: float):
        super().__init__(config)
        self.app = app
        self.shutdown_timeout = shutdown_timeout
        self._draining = False

    def on_signal(self, sig: int, frame) -> None:
        """Signal handler (main thread): first signal drains, a second one exits at once."""
        loop = self.app.state.coserve.loop
        if self._draining or loop is None:
            self.should_exit = True
            self.force_exit = self._draining
            return
        self._draining = True
        log.info("signal %s: draining (readiness 503, up to %.0fs for in-flight requests)", sig,
                 self.shutdown_timeout)
        asyncio.run_coroutine_threadsafe(self._drain(), loop)

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
    # The engine loop and the event loop share the GIL; a short switch interval keeps the
    # engine from waiting up to 5 ms for the GIL after each torch op that released it.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = resolve_model(settings)
    try:
        keys = KeyRing(settings.api_keys_file, settings.api_keys)
    except KeysError as exc:
        raise SystemExit(f"API keys refused: {exc}") from exc
    if keys.open:
        log.warning("no API keys configured: running open, every caller is tenant %r with admin rights "
                    "(set --api-keys-file or COSERVE_API_KEYS)", OPEN_TENANT)
    else:
        log.info("%d API keys configured; adapters are per tenant", keys.count())
    engine = LLMEngine(settings.engine_config(model_dir))
    adapter_specs = settings.adapter_specs()
    for name, path in adapter_specs:
        try:
            adapter = engine.adapters.register_dir(name, path)
        except AdapterError as exc:
            raise SystemExit(f"adapter {name} ({path}) refused: {exc}") from exc
        log.info("adapter %s: %s, rank %d, %d modules, %.1f KiB", name, adapter.method, adapter.rank,
                 len(adapter.modules), adapter.nbytes / 1024)
    info, q = engine.info, engine.info.quantize
    log.info("loaded %s (%s, %d layers, dtype %s)", model_dir, engine.model.config.model_type,
             engine.model.config.num_hidden_layers, info.dtype)
    log.info("quantization: %s (%d linears quantized, %d kept; %.1f MiB of linear weights)",
             q.mode, q.num_quantized, q.num_kept, q.linear_bytes / 2**20)
    log.info("KV cache: %d blocks of %d tokens (%.1f MiB); context window %d tokens",
             info.kv.num_blocks, info.kv.block_size, info.kv.num_blocks * info.kv.bytes_per_block / 2**20,
             info.max_model_len)
    embedded, store = open_store(settings)
    server_config = settings.server_config(model_dir)
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine, server_config, external_engine_loop=True, store=store, keys=keys,
                     shared_adapters={name for name, _ in adapter_specs})
    uv_config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                               timeout_graceful_shutdown=5)
    server = DrainingServer(uv_config, app, settings.shutdown_timeout)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.on_signal)
    http_thread = threading.Thread(target=server.run, name="coserve-http", daemon=True)
    http_thread.start()
    log.info("serving model %r at http://%s:%d/v1", server_config.served_model_name, settings.host, settings.port)
    watcher = threading.Thread(target=_stop_engine_when_done, args=(http_thread, async_engine), daemon=True)
    watcher.start()
    try:
        async_engine.run()  # the engine loop owns the main thread until the HTTP server is gone
        http_thread.join(10)
    finally:
        if embedded is not None:
            embedded.stop()
    if not server.started:
        raise SystemExit(f"the HTTP server did not start on {settings.host}:{settings.port} (see the log above)")


def open_store(settings: ServeSettings) -> tuple[EmbeddedRedis | None, AdapterStore]:
    """The adapter store on --redis-url, or on a private redis-server under the data directory."""
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(Path(settings.data_dir) / "redis").start()
        url = embedded.url
    store = AdapterStore(connect(url), prefix=settings.store_prefix)
    if not store.ping():
        if embedded is not None:
            embedded.stop()
        raise SystemExit(f"the adapter store at {url} does not answer")
    log.info("adapter store: %s (prefix %r)", url if embedded is None else "embedded " + url, settings.store_prefix)
    return embedded, store


def _stop_engine_when_done(http_thread: threading.Thread, engine: AsyncEngine) -> None:
    http_thread.join()
    engine.stop()
