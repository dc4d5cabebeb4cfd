"""Fine-tuning files and jobs in Redis, per tenant, and the job queue (a stream with a consumer group).

Keys (prefix p):
  {p}:file:{id}             HASH  tenant, meta (JSON of the public file object), data (the JSONL bytes)
  {p}:files:{tenant}        ZSET  file ids by creation time
  {p}:job:{id}              HASH  tenant, job (JSON of the public job object), spec (the accepted request)
  {p}:jobs:{tenant}         ZSET  job ids by creation time
  {p}:job:{id}:events       LIST  event objects (JSON), oldest first
  {p}:job:{id}:checkpoints  LIST  checkpoint objects (JSON), oldest first
  {p}:job:{id}:state        STRING the newest resumable checkpoint (safetensors)
  {p}:job-queue             STREAM one entry per job to run; consumer group "trainers"

Every state change of a job is one MULTI/EXEC (WATCHed where it depends on the current status), so a
reader never sees a checkpoint without its record or a terminal job that is still queued.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from coserve.adapters.store import unavailable_on_errors, watched

GROUP = "trainers"
TERMINAL = ("succeeded", "failed", "cancelled")


def new_id(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(12)}"


@dataclass
class Claimed:
    entry_id: str  # the stream entry
    job_id: str
    deliveries: int  # times this entry was handed to a consumer (1 on the first delivery)


class FineTuneStore:
    def __init__(self, client: redis.Redis, prefix: str = "coserve"):
        self.r, self.p = client, prefix
        self.queue = f"{prefix}:job-queue"

    # ---- files ----
    def put_file(self, tenant: str, meta: dict, data: bytes) -> None:
        with unavailable_on_errors():
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(f"{self.p}:file:{meta['id']}", mapping={"tenant": tenant, "meta": json.dumps(meta),
                                                               "data": data})
            pipe.zadd(f"{self.p}:files:{tenant}", {meta["id"]: meta["created_at"]})
            pipe.execute()

    def file_meta(self, tenant: str, file_id: str) -> dict | None:
        with unavailable_on_errors():
            tenant_of, meta = self.r.hmget(f"{self.p}:file:{file_id}", ["tenant", "meta"])
        if tenant_of is None or tenant_of.decode() != tenant:
            return None  # another tenant's file is as missing as one that never existed
        return json.loads(meta)

    def file_data(self, tenant: str, file_id: str) -> bytes | None:
        with unavailable_on_errors():
            tenant_of, data = self.r.hmget(f"{self.p}:file:{file_id}", ["tenant", "data"])
        return data if tenant_of is not None and tenant_of.decode() == tenant else None

    def list_files(self, tenant: str) -> list[dict]:
        with unavailable_on_errors():
            ids = self.r.zrevrange(f"{self.p}:files:{tenant}", 0, -1)
            metas = [self.r.hget(f"{self.p}:file:{i.decode()}", "meta") for i in ids]
        return [json.loads(m) for m in metas if m is not None]

    def delete_file(self, tenant: str, file_id: str) -> bool:
        if self.file_meta(tenant, file_id) is None:
            return False
        with unavailable_on_errors():
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(f"{self.p}:file:{file_id}")
            pipe.zrem(f"{self.p}:files:{tenant}", file_id)
            pipe.execute()
        return True

    # ---- jobs ----
    def _job_key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def create_job(self, tenant: str, job: dict, spec: dict) -> None:
        """Record the job (validating_files) and index it; enqueue() makes it runnable."""
        with unavailable_on_errors():
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(self._job_key(job["id"]), mapping={"tenant": tenant, "job": json.dumps(job),
                                                         "spec": json.dumps(spec)})
            pipe.zadd(f"{self.p}:jobs:{tenant}", {job["id"]: job["created_at"]})
            pipe.execute()

    def job(self, tenant: str | None, job_id: str) -> dict | None:
        """The public job object (None if missing or another tenant's; tenant None: any)."""
        with unavailable_on_errors():
            tenant_of, job = self.r.hmget(self._job_key(job_id), ["tenant", "job"])
        if tenant_of is None or (tenant is not None and tenant_of.decode() != tenant):
            return None
        return json.loads(job)

    def job_spec(self, job_id: str) -> tuple[str, dict] | None:
        with unavailable_on_errors():
            tenant, spec = self.r.hmget(self._job_key(job_id), ["tenant", "spec"])
        return None if tenant is None else (tenant.decode(), json.loads(spec))

    def list_jobs(self, tenant: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        with unavailable_on_errors():
            ids = [i.decode() for i in self.r.zrevrange(f"{self.p}:jobs:{tenant}", 0, -1)]
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        page = [j for j in (self.job(tenant, i) for i in ids[: limit + 1]) if j is not None]
        return page[:limit], len(page) > limit

    def update_job(self, job_id: str, change: Callable[[dict], dict | None], extra: Callable | None = None) -> dict:
        """Apply `change` to the job atomically (WATCH); it returns None to leave the job as is.
        `extra(pipe, job)` may add commands to the same transaction."""
        key = self._job_key(job_id)

        def attempt(pipe) -> dict:
            raw = pipe.hget(key, "job")
            if raw is None:
                raise KeyError(job_id)
            job = json.loads(raw)
            new = change(dict(job))
            if new is None:
                return job
            pipe.multi()
            pipe.hset(key, "job", json.dumps(new))
            if extra is not None:
                extra(pipe, new)
            return new

        return watched(self.r, key, attempt)

    def enqueue(self, job_id: str) -> None:
        with unavailable_on_errors():
            self.r.xadd(self.queue, {"job": job_id})

    def add_event(self, job_id: str, level: str, message: str, type_: str = "message", data: dict | None = None,
                  pipe=None) -> None:
        event = {"object": "fine_tuning.job.event", "id": new_id("ftevent"), "created_at": int(time.time()),
                 "level": level, "message": message, "type": type_, "data": data or {}}
        target = pipe if pipe is not None else self.r
        with unavailable_on_errors():
            target.rpush(f"{self._job_key(job_id)}:events", json.dumps(event))

    def events(self, job_id: str) -> list[dict]:
        with unavailable_on_errors():
            return [json.loads(e) for e in self.r.lrange(f"{self._job_key(job_id)}:events", 0, -1)]

    def save_checkpoint(self, job_id: str, checkpoint: dict, state: bytes, trained_tokens: int) -> None:
        """The resumable state and its public record in one transaction."""
        def change(job: dict) -> dict | None:
            if job["status"] in TERMINAL:
                return None  # a cancelled job keeps no further checkpoints
            job["trained_tokens"] = trained_tokens
            return job

        def extra(pipe, job: dict) -> None:
            pipe.set(f"{self._job_key(job_id)}:state", state)
            pipe.rpush(f"{self._job_key(job_id)}:checkpoints", json.dumps(checkpoint))

        self.update_job(job_id, change, extra)

    def checkpoints(self, job_id: str) -> list[dict]:
        with unavailable_on_errors():
            return [json.loads(c) for c in self.r.lrange(f"{self._job_key(job_id)}:checkpoints", 0, -1)]

    def resume_state(self, job_id: str) -> bytes | None:
        with unavailable_on_errors():
            return self.r.get(f"{self._job_key(job_id)}:state")

    def drop_state(self, job_id: str) -> None:
        with unavailable_on_errors():
            self.r.delete(f"{self._job_key(job_id)}:state")

    # ---- the queue ----
    def ensure_group(self) -> None:
        with unavailable_on_errors():
            try:
                self.r.xgroup_create(self.queue, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def claim_next(self, consumer: str, min_idle_s: float, block_ms: int) -> Claimed | None:
        """A job another consumer left idle for min_idle_s (dead replica), else a new one (blocking)."""
        with unavailable_on_errors():
            # [next cursor, entries] (Redis 6.2) or [next cursor, entries, deleted ids] (Redis 7)
            stale = self.r.xautoclaim(self.queue, GROUP, consumer, int(min_idle_s * 1000), "0-0", count=1)[1]
            if stale:
                entry_id, fields = stale[0]
            else:
                got = self.r.xreadgroup(GROUP, consumer, {self.queue: ">"}, count=1, block=block_ms)
                if not got or not got[0][1]:
                    return None
                entry_id, fields = got[0][1][0]
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            pending = self.r.xpending_range(self.queue, GROUP, entry_id, entry_id, 1)
        deliveries = pending[0]["times_delivered"] if pending else 1
        return Claimed(entry_id, fields[b"job"].decode(), deliveries)

    def heartbeat(self, consumer: str, entry_id: str) -> None:
        """Reset the entry's idle time (JUSTID: the delivery counter stays) so nobody takes it over."""
        with unavailable_on_errors():
            self.r.xclaim(self.queue, GROUP, consumer, 0, [entry_id], justid=True)

    def ack(self, entry_id: str) -> None:
        with unavailable_on_errors():
            self.r.xack(self.queue, GROUP, entry_id)
            self.r.xdel(self.queue, entry_id)
