"""coserve's Python client on httpx: `Client` (sync) and `AsyncClient` (async), same methods.

    from coserve.clients import Client
    client = Client()                      # COSERVE_URL (default http://127.0.0.1:8000), COSERVE_API_KEY
    print(client.complete("demo-small", "Hello").text)
    for chunk in client.chat("demo-small", [{"role": "user", "content": "Hi"}], stream=True):
        print(chunk.text, end="")
    client.adapters.upload("support-bot", "./my-peft-dir")      # or a PeftModel in memory
    job = client.fine_tuning.create("demo-small", client.files.upload("train.jsonl").id)
    job = client.fine_tuning.wait(job.id, on_progress=print)

Every method is one `Call` (method, path, body, how to parse the answer) run by the client's
transport, so the two clients share everything but the I/O. Errors raise CoserveError with the
server's status and message; 429 and 503 are retried with backoff, honouring Retry-After.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from coserve.clients.types import (
    Adapter,
    Chunk,
    Completion,
    Event,
    FileObject,
    Job,
    Model,
    error_from,
    job_progress,
)

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Call:
    method: str
    path: str
    json: Any = None
    params: dict | None = None
    files: Any = None
    data: dict | None = None
    parse: Callable[[Any], Any] = lambda body: body
    binary: bool = False  # the answer is bytes, not JSON


def _page(kind):
    return lambda body: [kind.of(d) for d in body["data"]]


def _peft_files(source: Any) -> list[tuple[str, tuple[str, bytes]]]:
    """A PEFT directory on disk, or anything with save_pretrained (a PeftModel), as multipart files."""
    if hasattr(source, "save_pretrained"):
        with tempfile.TemporaryDirectory() as tmp:
            source.save_pretrained(tmp)
            adapter_dirs = [p.parent for p in Path(tmp).rglob(PEFT_FILES[0])]
            return _peft_files(adapter_dirs[0])
    path = Path(source)
    if path.is_file():  # an archive of the directory
        return [("files", (path.name, path.read_bytes()))]
    missing = [n for n in PEFT_FILES if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} has no {missing[0]} (a PEFT adapter directory holds "
                                f"{' and '.join(PEFT_FILES)})")
    return [("files", (n, (path / n).read_bytes())) for n in PEFT_FILES]


def extract_adapter(archive: bytes, dest: str | Path) -> Path:
    """Unpack a downloaded adapter (.tar.gz) so that dest is the PEFT directory (members stay inside it)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tf:
        members = [m for m in tf.getmembers() if not m.isdir()]
        tops = {Path(m.name).parts[0] for m in members}
        if len(tops) == 1 and all(len(Path(m.name).parts) > 1 for m in members):  # the server's `name/` folder
            for m in members:
                m.name = str(Path(*Path(m.name).parts[1:]))
        tf.extractall(dest, members=members, filter="data")
    return dest


class Adapters:
    def __init__(self, send):
        self._send = send

    def upload(self, name: str, source: Any, codec: str = "none"):
        """Store a PEFT adapter (directory, archive file, or PeftModel) under `name`; a new version if it exists."""
        return self._send(Call("POST", "/v1/adapters", files=_peft_files(source),
                               data={"name": name, "codec": codec}, parse=Adapter.of))

    def list(self, after: str | None = None, limit: int = 100):
        return self._send(Call("GET", "/v1/adapters", params={"after": after, "limit": limit},
                               parse=_page(Adapter)))

    def get(self, name: str):
        return self._send(Call("GET", f"/v1/adapters/{name}", parse=Adapter.of))

    def download(self, name: str):
        """The adapter as .tar.gz bytes (extract_adapter() unpacks it)."""
        return self._send(Call("GET", f"/v1/adapters/{name}/download", binary=True))

    def delete(self, name: str):
        return self._send(Call("DELETE", f"/v1/adapters/{name}"))


class Files:
    def __init__(self, send):
        self._send = send

    def upload(self, source: str | Path | bytes, filename: str = "train.jsonl", purpose: str = "fine-tune"):
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        name = filename if isinstance(source, bytes) else Path(source).name
        return self._send(Call("POST", "/v1/files", files={"file": (name, data)}, data={"purpose": purpose},
                               parse=FileObject.of))

    def list(self):
        return self._send(Call("GET", "/v1/files", parse=_page(FileObject)))

    def get(self, file_id: str):
        return self._send(Call("GET", f"/v1/files/{file_id}", parse=FileObject.of))

    def delete(self, file_id: str):
        return self._send(Call("DELETE", f"/v1/files/{file_id}"))


class FineTuning:
    def __init__(self, send):
        self._send = send

    def create(self, model: str, training_file: str, *, validation_file: str | None = None,
               suffix: str | None = None, seed: int | None = None, n_epochs: int | str = "auto",
               batch_size: int | str = "auto", learning_rate_multiplier: float | str = "auto",
               adapter: dict | None = None, metadata: dict | None = None):
        body = {"model": model, "training_file": training_file, "validation_file": validation_file,
                "suffix": suffix, "seed": seed, "metadata": metadata,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {
                    "n_epochs": n_epochs, "batch_size": batch_size,
                    "learning_rate_multiplier": learning_rate_multiplier}}}}
        if adapter:
            body["adapter"] = adapter
        body = {k: v for k, v in body.items() if v is not None}
        return self._send(Call("POST", "/v1/fine_tuning/jobs", json=body, parse=Job.of))

    def get(self, job_id: str):
        return self._send(Call("GET", f"/v1/fine_tuning/jobs/{job_id}", parse=Job.of))

    def list(self, limit: int = 20, after: str | None = None):
        return self._send(Call("GET", "/v1/fine_tuning/jobs", params={"limit": limit, "after": after},
                               parse=_page(Job)))

    def events(self, job_id: str, limit: int = 100, after: str | None = None):
        """Newest first."""
        return self._send(Call("GET", f"/v1/fine_tuning/jobs/{job_id}/events",
                               params={"limit": limit, "after": after}, parse=_page(Event)))

    def checkpoints(self, job_id: str):
        return self._send(Call("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints", parse=lambda b: b["data"]))

    def cancel(self, job_id: str):
        return self._send(Call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel", parse=Job.of))


def _completion_call(model: str, prompt: Any, stream: bool, params: dict) -> Call:
    return Call("POST", "/v1/completions", json={"model": model, "prompt": prompt, "stream": stream, **params},
                parse=Completion.of)


def _chat_call(model: str, messages: list[dict], stream: bool, params: dict) -> Call:
    return Call("POST", "/v1/chat/completions", json={"model": model, "messages": messages, "stream": stream,
                                                      **params}, parse=Completion.of)


def _sse_chunk(line: str) -> Chunk | None:
    """One SSE line -> its Chunk (None for other lines and the final [DONE]); an error event raises."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    payload = json.loads(line[6:])
    if "error" in payload:
        raise error_from(500, payload)
    return Chunk.of(payload)


class _Base:
    _http_class: type  # httpx.Client | httpx.AsyncClient
    _jobs_class: type  # the fine_tuning resource with this transport's wait()

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 300.0,
                 max_retries: int = 3):
        self.url = (url or os.environ.get("COSERVE_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("COSERVE_API_KEY")
        self.max_retries = max_retries
        self.headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.timeout = timeout
        self._http = self._http_class(base_url=self.url, headers=self.headers, timeout=timeout)
        self.adapters, self.files = Adapters(self._send), Files(self._send)
        self.fine_tuning = self._jobs_class(self._send)

    def _delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None to give up."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        try:
            return min(30.0, float(response.headers.get("retry-after", "")))
        except ValueError:
            return min(30.0, 0.5 * 2**attempt)

    # The calls below return what the transport's _send/_stream return: values for Client, awaitables and
    # async iterators for AsyncClient.
    def models(self):
        """The models this key may use: list[Model]."""
        return self._send(Call("GET", "/v1/models", parse=_page(Model)))

    def complete(self, model: str, prompt: Any, stream: bool = False, **params):
        """A Completion, or with stream=True an iterator of Chunks."""
        call = _completion_call(model, prompt, stream, params)
        return self._stream(call) if stream else self._send(call)

    def chat(self, model: str, messages: list[dict], stream: bool = False, **params):
        call = _chat_call(model, messages, stream, params)
        return self._stream(call) if stream else self._send(call)

    @staticmethod
    def _result(call: Call, response: httpx.Response):
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise error_from(response.status_code, body)
        return response.content if call.binary else call.parse(response.json())

    @staticmethod
    def _request_args(call: Call) -> dict:
        params = {k: v for k, v in (call.params or {}).items() if v is not None}
        return {"json": call.json, "params": params or None, "files": call.files, "data": call.data}


class _SyncJobs(FineTuning):
    def wait(self, job_id: str, poll_s: float = 1.0, timeout: float | None = None,
             on_progress: Callable[[Job, tuple[int, int] | None], None] | None = None) -> Job:
        """Poll until the job ends; on_progress(job, (step, total) or None) after each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_progress is not None:
                on_progress(job, job_progress(self.events(job_id, limit=20)))
            if job.done or (deadline is not None and time.monotonic() > deadline):
                return job
            time.sleep(poll_s)


class Client(_Base):
    _http_class, _jobs_class = httpx.Client, _SyncJobs

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, call: Call):
        for attempt in range(self.max_retries + 1):
            response = self._http.request(call.method, call.path, **self._request_args(call))
            delay = self._delay(response, attempt)
            if delay is None:
                return self._result(call, response)
            time.sleep(delay)

    def _stream(self, call: Call) -> Iterator[Chunk]:
        with self._http.stream(call.method, call.path, json=call.json) as response:
            if response.status_code >= 400:
                response.read()
                self._result(call, response)
            for line in response.iter_lines():
                chunk = _sse_chunk(line)
                if chunk is not None:
                    yield chunk

class _AsyncJobs(FineTuning):
    async def wait(self, job_id: str, poll_s: float = 1.0, timeout: float | None = None,
                   on_progress: Callable[[Job, tuple[int, int] | None], None] | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if on_progress is not None:
                on_progress(job, job_progress(await self.events(job_id, limit=20)))
            if job.done or (deadline is not None and time.monotonic() > deadline):
                return job
            await asyncio.sleep(poll_s)


class AsyncClient(_Base):
    _http_class, _jobs_class = httpx.AsyncClient, _AsyncJobs

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _send(self, call: Call):
        for attempt in range(self.max_retries + 1):
            response = await self._http.request(call.method, call.path, **self._request_args(call))
            delay = self._delay(response, attempt)
            if delay is None:
                return self._result(call, response)
            await asyncio.sleep(delay)

    async def _stream(self, call: Call) -> AsyncIterator[Chunk]:
        async with self._http.stream(call.method, call.path, json=call.json) as response:
            if response.status_code >= 400:
                await response.aread()
                self._result(call, response)
            async for line in response.aiter_lines():
                chunk = _sse_chunk(line)
                if chunk is not None:
                    yield chunk
