"""A real `coserve serve` process on loopback, driven over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    process: subprocess.Popen
    url: str
    log_path: Path
    model_dir: Path
    data_dir: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_server(model_dir: Path, tmp: Path, *extra: str, wait_ready: bool = True) -> LiveServer:
    port = free_port()
    Path(tmp).mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"server-{port}.log"
    cmd = [sys.executable, "-m", "coserve.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--data-dir", str(tmp), "--kv-cache-memory", "64MiB", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    server = LiveServer(proc, f"http://127.0.0.1:{port}", log_path, Path(model_dir), Path(tmp))
    deadline = time.monotonic() + 120
    while wait_ready:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(server.url + "/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server not ready:\n{server.log()}")
        time.sleep(0.2)
    return server


@pytest.fixture(scope="session")
def server(demo_tiny, tmp_path_factory):
    srv = start_server(demo_tiny, tmp_path_factory.mktemp("srv"), "--max-queued-requests", "64",
                       "--served-model-name", "demo-tiny")
    yield srv
    srv.stop()
