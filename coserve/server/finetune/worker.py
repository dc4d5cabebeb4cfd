"""One thread per replica that takes fine-tuning jobs from the Redis stream and runs them in this
replica's engine.

A job is a stream entry in the consumer group: the replica that reads it owns it and keeps its
idle time low (heartbeat XCLAIM ... JUSTID). If the replica dies, the entry goes idle and another
replica takes it over with XAUTOCLAIM after `claim_idle_s`, resuming from the job's last checkpoint.
Every delivery counts: past `max_deliveries` the job fails with a reason. Handling is idempotent:
a job already terminal is acknowledged, and a job whose adapter is already stored is done.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from coserve.adapters.archive import PeftFiles
from coserve.adapters.ingest import peft_files, prepare
from coserve.adapters.store import AdapterStore, StoreUnavailable
from coserve.adapters.types import AdapterError, BaseModelShape
from coserve.engine.async_engine import AsyncEngine
from coserve.engine.tokenizer import ModelTokenizer
from coserve.engine.training.dataset import DatasetError, parse_jsonl, tokenize
from coserve.engine.training.module_selection import ModuleSelection, module_costs, probe_adapter, select_modules
from coserve.engine.training.params import AdapterSpec
from coserve.engine.training.trainer import TrainingEvent, TrainingJobSpec
from coserve.kernels.threads import use_one_torch_thread
from coserve.server.finetune.records import TERMINAL, Claimed, FineTuneStore, new_id

log = logging.getLogger("coserve.jobs")

BASE_LEARNING_RATE = {"LORA": 2e-4, "ROAD": 2e-3, "SHIRA": 1e-3}  # times learning_rate_multiplier


@dataclass(frozen=True)
class WorkerConfig:
    claim_idle_s: float = 60.0  # a job idle this long (its replica died) is taken over
    max_deliveries: int = 3  # deliveries of one job before it fails
    microbatch_tokens: int = 1024  # training tokens forwarded before a backward pass
    poll_s: float = 0.25  # how often a running job checks for cancellation


@dataclass
class ModelInfo:
    """What the worker needs of this replica's model."""

    name: str  # served model name
    fingerprint: str
    shape: BaseModelShape
    max_rank: int
    max_model_len: int
    eos_id: int | None


class JobFailed(Exception):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def adapter_spec(block: dict) -> AdapterSpec:
    """The API's validated `adapter` block -> what the engine trains ("all-linear" and "auto": every module;
    "auto" narrows it to the probe's selection later)."""
    targets = block["target_modules"]
    selection = block.get("token_selection") or {}
    return AdapterSpec(
        peft_type=block["peft_type"], r=block["r"], lora_alpha=block["lora_alpha"], use_dora=block["use_dora"],
        use_rslora=block["use_rslora"], variant=block["variant"], group_size=block["group_size"],
        target_modules=tuple(targets) if isinstance(targets, list) else AdapterSpec().target_modules,
        target_sparsity=selection.get("target_sparsity"),
        shared_threshold=selection.get("threshold", "shared") == "shared")


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:{suffix or ''}:{job_id}"


class JobWorker:
    def __init__(self, records: FineTuneStore, adapters: AdapterStore, engine: AsyncEngine,
                 tokenizer: ModelTokenizer, model: ModelInfo, config: WorkerConfig):
        self.records, self.adapters, self.engine = records, adapters, engine
        self.tokenizer, self.model, self.config = tokenizer, model, config
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="coserve-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        use_one_torch_thread()  # reads adapter files with torch; see kernels/threads.py
        group_ready = False  # the consumer group is created once, and again after any error (a flushed Redis)
        while not self._stop.is_set():
            try:
                if not group_ready:
                    self.records.ensure_group()
                    group_ready = True
                claimed = self.records.claim_next(self.consumer, self.config.claim_idle_s, block_ms=500)
                if claimed is not None:
                    self._handle(claimed)
            except StoreUnavailable as exc:
                log.warning("job queue unavailable: %s", exc)
                group_ready = False
                self._stop.wait(1.0)
            except Exception:  # noqa: BLE001 - the worker outlives any one job
                log.exception("job worker error")
                group_ready = False
                self._stop.wait(1.0)

    # ---- one job ----
    def _handle(self, claimed: Claimed) -> None:
        job_id = claimed.job_id
        loaded = self.records.job_spec(job_id)
        job = self.records.job(None, job_id)
        if loaded is None or job is None or job["status"] in TERMINAL:
            self.records.ack(claimed.entry_id)
            return
        tenant, request = loaded
        name = fine_tuned_name(request["base_model"], request.get("suffix"), job_id)
        if claimed.deliveries > self.config.max_deliveries:
            self._finish(claimed, job_id, "failed", error={
                "code": "job_interrupted", "param": None,
                "message": f"the job was interrupted {claimed.deliveries - 1} times (its replica stopped); "
                           f"giving up after {self.config.max_deliveries} deliveries"})
            return
        if self.adapters.get(tenant, name) is not None:  # trained before an interruption: just record it
            self._finish(claimed, job_id, "succeeded", fine_tuned_model=name)
            return
        try:
            self._train(claimed, tenant, request, name)
        except StoreUnavailable:
            # Redis went away mid-job: stop training here; the entry stays pending and the job resumes
            # from its last checkpoint once a replica claims it again.
            self.engine.cancel_training(job_id)
            raise
        except JobFailed as exc:
            self._finish(claimed, job_id, "failed", error={"code": exc.code, "message": exc.message,
                                                           "param": exc.param})

    def _train(self, claimed: Claimed, tenant: str, request: dict, name: str) -> None:
        job_id = claimed.job_id
        resume = self.records.resume_state(job_id)
        spec = self._spec(tenant, request, resume)

        def start(job: dict) -> dict | None:
            if job["status"] in TERMINAL:
                return None
            job["status"] = "running"
            return job

        if self.records.update_job(job_id, start)["status"] != "running":
            self.records.ack(claimed.entry_id)
            return
        started = "resumed from its last checkpoint" if resume else "started"
        self.records.add_event(job_id, "info", f"Fine-tuning job {started} on {self.consumer} "
                               f"(delivery {claimed.deliveries})")
        if request["adapter"]["target_modules"] == "auto":
            selection = self._module_selection(claimed, spec, request["adapter"])
            if selection is None:  # the probe failed, or the job was cancelled or this replica stopped
                return
            spec = replace(spec, adapter=replace(spec.adapter, target_parts=selection.parts()))
        self._run_in_engine(claimed, spec, lambda event: self._on_event(claimed, tenant, name, event))

    def _run_in_engine(self, claimed: Claimed, spec: TrainingJobSpec,
                       on_event: Callable[[TrainingEvent], bool]) -> bool:
        """Train `spec` in this replica's engine, heartbeating the queue entry, until on_event says the
        job ended (True); False when the job was cancelled or this replica is stopping."""
        job_id = claimed.job_id
        events: queue.Queue[TrainingEvent] = queue.Queue()
        self.engine.submit_training(spec, events.put)
        last_beat = last_check = time.monotonic()
        while True:
            if self._stop.is_set():  # shutting down: stop training, leave the entry for another replica
                self.engine.cancel_training(job_id)
                return False
            try:
                event = events.get(timeout=self.config.poll_s)
            except queue.Empty:
                event = None
            now = time.monotonic()
            if now - last_beat > self.config.claim_idle_s / 4:
                self.records.heartbeat(self.consumer, claimed.entry_id)
                last_beat = now
            if now - last_check > self.config.poll_s:
                last_check = now
                if self._cancelled(job_id):
                    self.engine.cancel_training(job_id)
                    self.records.ack(claimed.entry_id)
                    self.records.drop_state(job_id)
                    return False
            if event is not None and on_event(event):
                return True

    def _module_selection(self, claimed: Claimed, spec: TrainingJobSpec, block: dict) -> ModuleSelection | None:
        """`target_modules: "auto"`: the job's recorded selection, or a probe run that makes one."""
        job_id = claimed.job_id
        recorded = (self.records.job(None, job_id) or {}).get("module_selection")
        if recorded:  # resumed after the probe: train the same modules
            return ModuleSelection.from_json(recorded)
        steps = block["probe_steps"]
        probe = replace(spec, adapter=probe_adapter(spec.adapter), validation=[], max_steps=steps,
                        checkpoint_every=steps + 1, init_tensors=None, resume=None)
        density: dict[str, float] = {}

        def on_event(event: TrainingEvent) -> bool:
            if event.kind == "metrics":
                return self._on_event(claimed, "", "", replace(event, data=event.data | {"phase": "probe"}))
            if event.kind == "succeeded":
                density.update(event.data["token_density"])
                return True
            return self._on_event(claimed, "", "", event)  # failed | cancelled: the job ends

        self.records.add_event(job_id, "info", f"Probing every linear module for {steps} steps to rank them "
                               "by token density (target_modules: auto)")
        if not self._run_in_engine(claimed, probe, on_event) or not density:
            return None
        selection = select_modules(density, module_costs(spec.adapter, self.model.shape),
                                   block["parameter_budget"], steps)
        chosen = [m for m in selection.ranking if m.selected]

        def record(job: dict) -> dict | None:
            if job["status"] in TERMINAL:
                return None
            job["module_selection"] = selection.to_json()
            return job

        def extra(pipe, job: dict) -> None:
            densest = ", ".join(f"{m.module} {m.token_density:.2f}" for m in chosen[:3])
            self.records.add_event(job_id, "info", f"Selected {len(chosen)} of {len(selection.ranking)} modules "
                                   f"({selection.selected_parameters} of {selection.parameter_budget} parameters) by "
                                   f"token density; densest: {densest}", "message", selection.to_json(), pipe=pipe)

        self.records.update_job(job_id, record, extra)
        return selection

    def _cancelled(self, job_id: str) -> bool:
        job = self.records.job(None, job_id)
        return job is None or job["status"] == "cancelled"

    def _on_event(self, claimed: Claimed, tenant: str, name: str, event: TrainingEvent) -> bool:
        """Record one training event; True when the job ended."""
        job_id, data = claimed.job_id, event.data
        if event.kind == "metrics":
            parts = [f"{k}={v:.4f}" for k, v in data.items() if k in ("train_loss", "valid_loss") and v is not None]
            step = f"Step {data['step']}/{data['total_steps']}" if "total_steps" in data else f"Step {data['step']}"
            step = f"Probe {step.lower()}" if data.get("phase") == "probe" else step
            self.records.add_event(job_id, "info", f"{step}: {', '.join(parts)}", "metrics", data)
        elif event.kind == "checkpoint":
            checkpoint = {"object": "fine_tuning.job.checkpoint", "id": new_id("ftckpt"),
                          "created_at": int(time.time()), "fine_tuning_job_id": job_id,
                          "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{data['step']}",
                          "step_number": data["step"], "metrics": {"step": data["step"],
                                                                   "train_loss": data.get("train_loss")}}
            self.records.save_checkpoint(job_id, checkpoint, event.payload, data.get("trained_tokens", 0))
        elif event.kind == "succeeded":
            if self._cancelled(job_id):  # cancelled while the last step ran: store nothing
                self.records.ack(claimed.entry_id)
                return True
            self._store_adapter(tenant, name, event.files)
            if not self._finish(claimed, job_id, "succeeded", fine_tuned_model=name,
                                trained_tokens=data.get("trained_tokens")):
                self.adapters.delete(tenant, name)  # cancelled in between: the adapter must not stay servable
            return True
        elif event.kind == "failed":
            self._finish(claimed, job_id, "failed", error={"code": data["code"], "message": data["message"],
                                                           "param": data.get("param")})
            return True
        elif event.kind == "cancelled":
            self.records.ack(claimed.entry_id)
            return True
        return False

    def _store_adapter(self, tenant: str, name: str, files: tuple[bytes, bytes]) -> None:
        """The trained adapter, validated like an upload, into the tenant's store (one transaction)."""
        try:
            prepared = prepare(PeftFiles(*files), name, self.model.shape, self.model.max_rank)
        except AdapterError as exc:
            raise JobFailed("invalid_adapter", f"the trained adapter failed validation: {exc}") from exc
        self.adapters.put(tenant, name, config=prepared.config, stored=prepared.stored,
                          original_bytes=prepared.original_bytes, sha256=prepared.sha256, method=prepared.method,
                          rank=prepared.rank, base_fingerprint=self.model.fingerprint, codec=prepared.codec)

    def _finish(self, claimed: Claimed, job_id: str, status: str, error: dict | None = None,
                fine_tuned_model: str | None = None, trained_tokens: int | None = None) -> bool:
        """Move the job to its terminal status; False if it had already ended (cancelled, say)."""
        applied: list[bool] = []

        def change(job: dict) -> dict | None:
            if job["status"] in TERMINAL:
                return None
            applied.append(True)
            job.update(status=status, finished_at=int(time.time()), error=error)
            if fine_tuned_model is not None:
                job["fine_tuned_model"] = fine_tuned_model
            if trained_tokens is not None:
                job["trained_tokens"] = trained_tokens
            return job

        def extra(pipe, job: dict) -> None:
            message = ("The job has successfully completed" if status == "succeeded"
                       else f"The job failed: {error['message']}" if error else f"The job {status}")
            self.records.add_event(job_id, "info" if status == "succeeded" else "error", message, pipe=pipe)

        self.records.update_job(job_id, change, extra)
        self.records.ack(claimed.entry_id)
        self.records.drop_state(job_id)
        return bool(applied)

    # ---- the engine's job spec ----
    def _spec(self, tenant: str, request: dict, resume: bytes | None) -> TrainingJobSpec:
        train = self._samples(tenant, request["training_file"], "training_file")
        validation = self._samples(tenant, request["validation_file"], "validation_file") \
            if request.get("validation_file") else []
        a = request["adapter"]
        adapter = adapter_spec(a)
        hp = request["hyperparameters"]
        init = None
        if request.get("continue_from"):
            init = self._adapter_tensors(tenant, request["continue_from"])
        return TrainingJobSpec(
            job_id=request["id"], base_model=request["base_model"], adapter=adapter, train=train,
            validation=validation, n_epochs=hp["n_epochs"], batch_size=hp["batch_size"],
            learning_rate=BASE_LEARNING_RATE[a["peft_type"]] * hp["learning_rate_multiplier"],
            seed=request["seed"], warmup_ratio=a["warmup_ratio"], weight_decay=a["weight_decay"],
            max_grad_norm=a["max_grad_norm"], checkpoint_every=a["checkpoint_every"],
            microbatch_tokens=self.config.microbatch_tokens, init_tensors=init, resume=resume)

    def _samples(self, tenant: str, file_id: str, param: str):
        data = self.records.file_data(tenant, file_id)
        if data is None:
            raise JobFailed("file_not_found", f"the file {file_id} no longer exists", param)
        try:
            examples = parse_jsonl(data)
            return [tokenize(self.tokenizer, e, self.model.eos_id, self.model.max_model_len) for e in examples]
        except DatasetError as exc:
            raise JobFailed("invalid_file", f"{param} {file_id}: {exc}", param) from exc

    def _adapter_tensors(self, tenant: str, name: str):
        from safetensors.torch import load

        record = self.adapters.get(tenant, name)
        if record is None:
            raise JobFailed("model_not_found", f"the adapter {name} no longer exists", "model")
        try:
            return load(peft_files(self.adapters, record).weights)
        except AdapterError as exc:
            raise JobFailed("model_not_found", str(exc), "model") from exc
