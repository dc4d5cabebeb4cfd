"""The engine loop, with an asyncio interface for callers on other threads.

The loop runs either in a background thread (`start()`, used by tests and embedders) or
in the calling thread (`run()`, used by `coserve serve` for the main thread: PyTorch's
OpenMP pool runs CPU kernels markedly faster from the main thread).

`generate()` returns an async iterator of RequestOutput. Closing it early (the
client went away) aborts the request: the loop frees its blocks before the
next step. Commands cross threads through a queue; outputs come back through
each caller's event loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from coserve.adapters.registry import AdapterSource
from coserve.adapters.types import LoadedAdapter
from coserve.engine.engine import LLMEngine, RequestOutput
from coserve.engine.training.trainer import TrainingEvent, TrainingJobSpec
from coserve.scheduler.request import SamplingParams

log = logging.getLogger("coserve.engine")

MAX_CONSECUTIVE_FAILURES = 3


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self.dead_reason: str | None = None
        self.last_heartbeat = time.monotonic()
        self.num_steps = 0
        self.num_running = 0  # requests running after the last step (read by other threads)

    # ---- lifecycle ----
    def start(self) -> None:
        """Run the loop in a background thread."""
        self._thread = threading.Thread(target=self.run, name="coserve-engine", daemon=True)
        self._thread.start()
        self._running.wait(5)

    def run(self) -> None:
        """Run the loop in the calling thread until stop()."""
        self._running.set()
        try:
            self._loop()
        finally:
            self._running.clear()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def started(self) -> bool:
        return self._running.is_set() or self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._running.is_set() and self.dead_reason is None

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._streams)

    # ---- requests ----
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: str | None = None,
        adapter_source: AdapterSource | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs until it finishes; leaving early aborts it."""
        if not self.alive:
            raise EngineDeadError(self.dead_reason or "the engine is not running")
        self.engine.check_request(len(prompt_token_ids), params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = stream
        self._send(("add", request_id, prompt_token_ids, params, adapter_id, adapter_source))
        finished = False
        try:
            while True:
                out = await stream.queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def abort_all(self, reason: str = "aborted") -> None:
        self._send(("abort_all", reason))

    def retire_adapters(self, match: Callable[[str], bool]) -> None:
        """Drop the adapters `match` selects from host and device once idle (see LLMEngine.retire_adapters)."""
        self._send(("retire", match))

    def register_adapter(self, name: str, source: AdapterSource, adapter: LoadedAdapter | None = None) -> None:
        """Register (or, when idle, replace) a named adapter on the engine thread."""
        self._send(("register", name, source, adapter))

    def submit_training(self, spec: TrainingJobSpec, sink: Callable[[TrainingEvent], None]) -> None:
        """Train a job in this engine's steps; `sink` receives its events on the engine thread."""
        self._send(("train", spec, sink))

    def cancel_training(self, job_id: str) -> None:
        self._send(("cancel_train", job_id))

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- the loop (engine thread) ----
    def _deliver(self, out: RequestOutput | BaseException, request_id: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
            except RuntimeError:  # the caller's loop is closed
                pass

    def _apply_commands(self) -> None:
        applied = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                if applied:
                    self.engine.publish_load()
                return
            applied = True
            kind = command[0]
            if kind == "add":
                _, request_id, prompt, params, adapter_id, source = command
                try:
                    self.engine.add_request(request_id, prompt, params, adapter_id, source)
                except Exception as exc:  # rejected: tell the caller, keep going
                    self._deliver(exc, request_id)
            elif kind == "retire":
                self.engine.retire_adapters(command[1])
            elif kind == "register":
                try:
                    self.engine.register_adapter(*command[1:])
                except RuntimeError as exc:  # in use: keep serving the current one
                    log.error("adapter %s not replaced: %s", command[1], exc)
            elif kind == "abort":
                out = self.engine.abort(command[1])
                if out is not None:
                    self._deliver(out, command[1])
            elif kind == "train":
                self.engine.submit_training(command[1], command[2])
            elif kind == "cancel_train":
                self.engine.cancel_training(command[1])
            elif kind == "abort_all":
                for out in self.engine.abort_all():
                    self._deliver(out, out.request_id)

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self.last_heartbeat = time.monotonic()
            self._apply_commands()
            if not self.engine.has_work:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
                failures = 0
            except Exception as exc:
                failures += 1
                log.error("engine step failed:\n%s", traceback.format_exc())
                message = f"engine step failed: {type(exc).__name__}: {exc}"
                for out in self.engine.abort_all(error=message):
                    self._deliver(out, out.request_id)
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    self.dead_reason = message
                    return
                continue
            self.num_steps += 1
            if not self.engine.last_step_tokens:  # nothing could run (adapters loading): don't spin
                self._wake.wait(0.005)
                self._wake.clear()
            self.num_running = self.engine.scheduler.num_requests_running
            for out in outputs:
                self._deliver(out, out.request_id)
