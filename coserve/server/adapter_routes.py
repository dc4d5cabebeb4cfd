"""The adapter store over HTTP: /v1/adapters (upload, list, get, download, delete), per tenant, and
vLLM's runtime endpoints /v1/load_lora_adapter and /v1/unload_lora_adapter (admin only).

An upload is validated in full against the base model before anything is stored; every
refusal is a 4xx naming the field or tensor and leaves no key behind.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from coserve.adapters.archive import CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE, PeftFiles, read_archive, write_tar_gz
from coserve.adapters.ingest import peft_files, prepare
from coserve.adapters.peft_format import load_adapter_dir
from coserve.adapters.store import AdapterRecord, AdapterStore
from coserve.adapters.types import AdapterError
from coserve.server.state import (
    ApiError,
    ServerState,
    authorize,
    require_admin,
    server_state,
    store_adapter_prefix,
)
from coserve.settings import ADAPTER_NAME

router = APIRouter(dependencies=[Depends(authorize)])
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
TOKEN_SELECTION_NOTE = b"""# A token-selective (TS-PEFT) adapter

`adapter_config.json` holds `coserve_token_selection`: one threshold tau per adapted module.
coserve applies the adapter's update to a token only when ||update|| / ||base output|| >= tau.
Plain peft ignores that key (it warns about an unexpected keyword) and applies every update, so
its outputs differ from coserve's. Upload this directory (or this archive) to coserve to serve it
with its gate: `POST /v1/adapters` or `coserve adapters push NAME DIR`.
"""
MAX_PAGE = 100


def _store(st: ServerState) -> AdapterStore:
    if st.store is None:
        raise ApiError(404, "this server runs without an adapter store", "NotFoundError")
    return st.store


def _check_name(st: ServerState, name: str, param: str = "name") -> str:
    if not ADAPTER_NAME.match(name or ""):
        raise ApiError(400, "adapter names are 1-128 of A-Z a-z 0-9 . _ - : starting with a letter or digit",
                       param=param)
    if name == st.config.served_model_name:
        raise ApiError(400, f"`{name}` is the base model's name", param=param)
    return name


def _adapter_json(record: AdapterRecord) -> dict:
    return {"id": record.name, "object": "adapter", **record.public()}


def _not_found(name: str) -> ApiError:
    return ApiError(404, f"The adapter `{name}` does not exist.", "NotFoundError", "name")


async def _own_record(st: ServerState, request: Request, name: str) -> AdapterRecord:
    record = await asyncio.to_thread(_store(st).get, request.state.principal.tenant, name)
    if record is None:  # another tenant's adapter answers exactly like a missing one
        raise _not_found(name)
    return record


async def _upload_files(request: Request, max_bytes: int) -> tuple[dict[str, str], PeftFiles]:
    """The multipart form -> its text fields and the PEFT files (two files, or one archive)."""
    try:
        form = await request.form(max_files=4, max_fields=8, max_part_size=64 * 1024)
    except MultiPartException as exc:
        raise ApiError(400, f"not a valid multipart upload: {exc.message}", param="body") from exc
    fields, uploads = {}, {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            uploads[Path(value.filename or key).name] = await value.read()
        else:
            fields[key] = value
    await form.close()
    archives = [n for n in uploads if n.lower().endswith(ARCHIVE_SUFFIXES)]
    if archives:
        if len(uploads) > 1:
            raise ApiError(400, "send either one archive or the two PEFT files, not both", param="files")
        return fields, read_archive(uploads[archives[0]], archives[0], max_bytes)
    for pickle_name in PICKLE_FILES:
        if pickle_name in uploads:
            raise AdapterError(f"{pickle_name} is a pickle; coserve takes {WEIGHTS_FILE} only", pickle_name)
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if needed not in uploads:
            raise ApiError(400, f"missing the file {needed} (or send one .tar.gz/.zip of the PEFT directory)",
                           param=needed)
    stray = sorted(set(uploads) - {CONFIG_FILE, WEIGHTS_FILE})
    if stray:
        raise ApiError(400, f"unexpected file {stray[0]}", param=stray[0])
    return fields, PeftFiles(uploads[CONFIG_FILE], uploads[WEIGHTS_FILE])


@router.post("/v1/adapters", status_code=201)
async def upload_adapter(request: Request):
    st = server_state(request)
    store = _store(st)
    try:
        fields, files = await _upload_files(request, st.config.max_upload_bytes)
        name = _check_name(st, fields.get("name", ""))
        codec = fields.get("codec", "none")
        try:
            density = float(fields.get("compeft_density", 0.1))
        except ValueError:
            raise ApiError(400, "compeft_density must be a number", param="compeft_density") from None
        runtime = st.engine.engine.adapters
        prepared = await asyncio.to_thread(prepare, files, name, runtime.shape, runtime.max_rank, codec, density)
    except AdapterError as exc:
        raise ApiError(422, str(exc), param=exc.field) from exc
    record = await asyncio.to_thread(
        store.put, request.state.principal.tenant, name, config=prepared.config, stored=prepared.stored,
        original_bytes=prepared.original_bytes, sha256=prepared.sha256, method=prepared.method,
        rank=prepared.rank, base_fingerprint=st.fingerprint, codec=prepared.codec)
    return JSONResponse(_adapter_json(record), status_code=201)


@router.get("/v1/adapters")
async def list_adapters(request: Request, limit: int = 20, after: str | None = None):
    st = server_state(request)
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, f"limit must lie in [1, {MAX_PAGE}]", param="limit")
    records, more = await asyncio.to_thread(_store(st).list, request.state.principal.tenant, after, limit)
    data = [_adapter_json(r) for r in records]
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, request: Request):
    return _adapter_json(await _own_record(server_state(request), request, name))


@router.get("/v1/adapters/{name}/download")
async def download_adapter(name: str, request: Request):
    """The current version as a .tar.gz PEFT directory (dense weights, whatever the stored codec)."""
    st = server_state(request)
    record = await _own_record(st, request, name)
    try:
        files = await asyncio.to_thread(peft_files, _store(st), record)
    except AdapterError as exc:
        raise _not_found(name) from exc
    folder = name.replace(":", "_")
    members = {CONFIG_FILE: files.config, WEIGHTS_FILE: files.weights}
    if b"coserve_token_selection" in files.config:
        members["README.md"] = TOKEN_SELECTION_NOTE
    body = await asyncio.to_thread(write_tar_gz, members, folder)
    return Response(body, media_type="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="{folder}.tar.gz"',
                             "x-adapter-version": str(record.version)})


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, request: Request):
    st = server_state(request)
    deleted = await asyncio.to_thread(_store(st).delete, request.state.principal.tenant, name)
    if not deleted:
        raise _not_found(name)
    return {"id": name, "object": "adapter", "deleted": True}


# ---- vLLM's runtime LoRA endpoints (this replica only; POST /v1/adapters shares across replicas) ----
class LoadLoraRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    lora_name: str


@router.post("/v1/load_lora_adapter", dependencies=[Depends(require_admin)])
async def load_lora_adapter(body: LoadLoraRequest, request: Request):
    """Serve the PEFT directory `lora_path` (on the server) as `lora_name` for every tenant."""
    st = server_state(request)
    name = _check_name(st, body.lora_name, "lora_name")
    if name in st.shared_adapters:
        raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    runtime = st.engine.engine.adapters
    if runtime.known(name):  # unloaded, but requests still run on it
        raise ApiError(409, f"The lora adapter '{name}' is still in use by running requests; retry shortly.",
                       param="lora_name", headers={"Retry-After": "1"})
    path = Path(body.lora_path)
    try:
        adapter = await asyncio.to_thread(load_adapter_dir, name, path, runtime.shape, runtime.max_rank)
    except AdapterError as exc:
        raise ApiError(422 if path.is_dir() else 404, str(exc), param=exc.field or "lora_path") from exc

    def source():
        return load_adapter_dir(name, path, runtime.shape, runtime.max_rank)

    st.engine.register_adapter(name, source, adapter)
    st.shared_adapters.add(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", dependencies=[Depends(require_admin)])
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request):
    st = server_state(request)
    name = body.lora_name
    if name not in st.shared_adapters:
        raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError", "lora_name")
    st.shared_adapters.discard(name)
    st.engine.retire_adapters(lambda key: key == name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def on_store_event(st: ServerState, event: dict) -> None:
    """A replica's view of store changes: drop replaced and deleted revisions from host and device."""
    if event.get("op") == "resync":  # events may have been missed: drop every stored revision once idle
        st.engine.retire_adapters(lambda key: "#" in key)
        return
    prefix = store_adapter_prefix(event["tenant"], event["name"])
    keep = f"{prefix}{event['revision']}" if event["op"] == "put" else None
    st.engine.retire_adapters(lambda key: key.startswith(prefix) and key != keep)
