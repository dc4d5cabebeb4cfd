"""OpenAI's files and fine-tuning endpoints (the `openai` SDK's clients work against them), per tenant.

/v1/files: JSONL uploads (purpose fine-tune), checked line by line on upload.
/v1/fine_tuning/jobs: create (validated, then queued in the Redis stream), list, get, cancel,
events, checkpoints. Another tenant's file or job answers exactly like a missing one.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from coserve.engine.training.dataset import DatasetError, parse_jsonl
from coserve.engine.training.params import parameter_count
from coserve.server.finetune.records import TERMINAL, FineTuneStore, new_id
from coserve.server.finetune.worker import adapter_spec, fine_tuned_name
from coserve.server.schemas import FineTuningJobRequest
from coserve.server.state import ApiError, ServerState, authorize, server_state

router = APIRouter(dependencies=[Depends(authorize)])
PURPOSES = ("fine-tune",)
MAX_PAGE = 100


def _records(request: Request) -> FineTuneStore:
    st = server_state(request)
    if st.finetune is None:
        raise ApiError(404, "this server runs without a store: files and fine-tuning are off", "NotFoundError")
    return st.finetune


def _tenant(request: Request) -> str:
    return request.state.principal.tenant


# ---------------------------------------------------------------- files
@router.post("/v1/files")
async def upload_file(request: Request):
    records = _records(request)
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=64 * 1024)
    except MultiPartException as exc:
        raise ApiError(400, f"not a valid multipart upload: {exc.message}", param="file") from exc
    purpose, upload = form.get("purpose"), form.get("file")
    if purpose not in PURPOSES:
        raise ApiError(400, f"purpose must be one of {list(PURPOSES)}", param="purpose")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "send the JSONL as the multipart field `file`", param="file")
    data = await upload.read()
    await form.close()
    try:
        examples = await asyncio.to_thread(parse_jsonl, data)
    except DatasetError as exc:
        raise ApiError(400, f"invalid fine-tuning file: {exc}", param="file") from exc
    meta = {"id": new_id("file"), "object": "file", "bytes": len(data), "created_at": int(time.time()),
            "filename": upload.filename or "file.jsonl", "purpose": purpose, "status": "processed",
            "status_details": None, "expires_at": None, "examples": len(examples)}
    await asyncio.to_thread(records.put_file, _tenant(request), meta, data)
    return meta


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None):
    files = await asyncio.to_thread(_records(request).list_files, _tenant(request))
    data = [f for f in files if purpose is None or f["purpose"] == purpose]
    return {"object": "list", "data": data, "has_more": False}


async def _own_file(request: Request, file_id: str, param: str = "file_id") -> dict:
    meta = await asyncio.to_thread(_records(request).file_meta, _tenant(request), file_id)
    if meta is None:
        raise ApiError(404, f"No such File object: {file_id}", "NotFoundError", param)
    return meta


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str):
    return await _own_file(request, file_id)


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str):
    await _own_file(request, file_id)
    await asyncio.to_thread(_records(request).delete_file, _tenant(request), file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# ---------------------------------------------------------------- jobs
async def _continued_adapter(st: ServerState, tenant: str, name: str) -> dict:
    """The adapter block of a stored LoRA/DoRA adapter the job continues training."""
    record = await asyncio.to_thread(st.store.get, tenant, name) if st.store is not None else None
    if record is None:
        raise ApiError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")
    if record.method not in ("LORA", "DORA"):
        raise ApiError(400, f"only LoRA/DoRA adapters can be trained further; `{name}` is {record.method}",
                       param="model")
    config = json.loads(record.config)
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("layers_to_transform"):
        raise ApiError(400, "adapters with rank/alpha patterns or layer subsets cannot be trained further",
                       param="model")
    targets = config.get("target_modules")
    return {"peft_type": "LORA", "r": config["r"], "lora_alpha": config.get("lora_alpha", 8),
            "use_dora": bool(config.get("use_dora")), "use_rslora": bool(config.get("use_rslora")),
            "target_modules": targets if isinstance(targets, list) else "all-linear"}


def _check_adapter_block(st: ServerState, adapter: dict) -> None:
    runtime = st.engine.engine.adapters
    if adapter["target_modules"] == "auto":
        if adapter["parameter_budget"] is None:
            raise ApiError(400, "adapter.parameter_budget is required with target_modules 'auto' (the trainable "
                           "parameters the selected modules may use)", param="adapter.parameter_budget")
        smallest = min(parameter_count(adapter_spec(adapter), *shape) for shape in runtime.shape.module_shapes.values())
        if adapter["parameter_budget"] < smallest:
            raise ApiError(400, f"adapter.parameter_budget {adapter['parameter_budget']} is below the smallest "
                           f"module's {smallest} parameters", param="adapter.parameter_budget")
    elif adapter["parameter_budget"] is not None:
        raise ApiError(400, "adapter.parameter_budget applies only with target_modules 'auto'",
                       param="adapter.parameter_budget")
    if adapter["peft_type"] == "LORA" and adapter["r"] > runtime.max_rank:
        raise ApiError(400, f"adapter.r {adapter['r']} is above the server's max_lora_rank {runtime.max_rank}",
                       param="adapter.r")
    if adapter["peft_type"] == "ROAD":
        targets = adapter["target_modules"]
        names = targets if isinstance(targets, list) else list(runtime.shape.module_shapes)
        for module in names:
            out_f = runtime.shape.module_shapes[module][0]
            if out_f % adapter["group_size"]:
                raise ApiError(400, f"adapter.group_size {adapter['group_size']} does not divide {module}'s "
                               f"{out_f} outputs", param="adapter.group_size")


@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request, body: FineTuningJobRequest):
    st = server_state(request)
    records, tenant = _records(request), _tenant(request)
    base = st.config.served_model_name
    adapter = body.adapter.model_dump()
    continue_from = None
    if body.model != base:
        if adapter["target_modules"] == "auto":
            raise ApiError(400, "target_modules 'auto' selects the modules of a new adapter; a continued adapter "
                           "keeps its own", param="adapter.target_modules")
        continued = await _continued_adapter(st, tenant, body.model)
        adapter.update(continued)
        continue_from = body.model
    _check_adapter_block(st, adapter)
    train_meta = await _own_file(request, body.training_file, "training_file")
    if body.validation_file is not None:
        await _own_file(request, body.validation_file, "validation_file")
    hp = body.resolved_hyperparameters()
    n = train_meta.get("examples", 1)
    hyper = {"n_epochs": 3 if hp.n_epochs == "auto" else hp.n_epochs,
             "batch_size": min(8, max(1, math.ceil(n / 8))) if hp.batch_size == "auto" else hp.batch_size,
             "learning_rate_multiplier": 1.0 if hp.learning_rate_multiplier == "auto"
             else hp.learning_rate_multiplier}
    job_id = new_id("ftjob")
    seed = body.seed if body.seed is not None else int.from_bytes(job_id.encode()[-4:], "little") % 2**31
    job = {"object": "fine_tuning.job", "id": job_id, "created_at": int(time.time()), "finished_at": None,
           "model": body.model, "fine_tuned_model": None, "organization_id": tenant, "status": "validating_files",
           "hyperparameters": hyper, "training_file": body.training_file, "validation_file": body.validation_file,
           "result_files": [], "trained_tokens": None, "error": None, "seed": seed, "suffix": body.suffix,
           "metadata": body.metadata, "estimated_finish": None, "integrations": [],
           "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}, "adapter": adapter}
    spec = {"id": job_id, "base_model": base, "training_file": body.training_file,
            "validation_file": body.validation_file, "suffix": body.suffix, "seed": seed,
            "hyperparameters": hyper, "adapter": adapter, "continue_from": continue_from}
    await asyncio.to_thread(records.create_job, tenant, job, spec)

    def queued(current: dict) -> dict | None:
        if current["status"] != "validating_files":
            return None
        current["status"] = "queued"
        return current

    job = await asyncio.to_thread(records.update_job, job_id, queued)
    await asyncio.to_thread(records.add_event, job_id, "info", f"Validated training file {body.training_file}; "
                            f"the job is queued (adapter {fine_tuned_name(base, body.suffix, job_id)})")
    await asyncio.to_thread(records.enqueue, job_id)
    return job


async def _own_job(request: Request, job_id: str) -> dict:
    job = await asyncio.to_thread(_records(request).job, _tenant(request), job_id)
    if job is None:
        raise ApiError(404, f"No such fine-tuning job: {job_id}", "NotFoundError", "fine_tuning_job_id")
    return job


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, f"limit must be 1..{MAX_PAGE}", param="limit")
    return limit


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(request: Request, after: str | None = None, limit: int = 20):
    jobs, more = await asyncio.to_thread(_records(request).list_jobs, _tenant(request), after,
                                         _limit(limit))
    return {"object": "list", "data": jobs, "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def get_job(request: Request, job_id: str):
    return await _own_job(request, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str):
    await _own_job(request, job_id)
    records = _records(request)

    ended: list[str] = []

    def cancel(job: dict) -> dict | None:
        if job["status"] in TERMINAL:
            ended.append(job["status"])
            return None
        job.update(status="cancelled", finished_at=int(time.time()))
        return job

    def extra(pipe, job: dict) -> None:
        records.add_event(job_id, "info", "The job was cancelled", pipe=pipe)

    job = await asyncio.to_thread(records.update_job, job_id, cancel, extra)
    if ended:
        raise ApiError(400, f"the job has already ended ({ended[-1]})", param="fine_tuning_job_id")
    return job


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    """Newest first, as OpenAI lists events and checkpoints; `after` is the last id already seen."""
    items = list(reversed(items))
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(request: Request, job_id: str, after: str | None = None, limit: int = 20):
    await _own_job(request, job_id)
    events = await asyncio.to_thread(_records(request).events, job_id)
    return _page(events, after, _limit(limit))


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int = 10):
    await _own_job(request, job_id)
    checkpoints = await asyncio.to_thread(_records(request).checkpoints, job_id)
    return _page(checkpoints, after, _limit(limit))
