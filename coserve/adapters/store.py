"""The Redis adapter store: versioned records per tenant, shared by every replica.

Keys (all under one prefix, default `coserve`; tenants are [A-Za-z0-9_-] so `:` separates):
  {p}:adapter:{tenant}:{name}   HASH   the current record's metadata (AdapterRecord fields)
  {p}:adapters:{tenant}         ZSET   the tenant's adapter names (score 0, lexicographic paging)
  {p}:blob:{revision}           STRING the stored tensors (safetensors bytes, maybe ComPEFT-coded)
  {p}:revision                  INT    global revision counter: a revision never names other bytes
  {p}:adapter-events            pub/sub channel: {"op": "put"|"delete", "tenant", "name", "revision"}

A put or delete is one MULTI/EXEC under WATCH of the record: the new blob, the record and
the index change together, and the event is published in the same transaction. The blob of
a replaced or deleted revision expires after `retired_blob_ttl_s`, so requests that resolved
the old revision just before still load it ("running requests finish on the old one").
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger("coserve.store")

RETIRED_BLOB_TTL_S = 600
T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """Redis cannot be reached (or is loading): the request should fail with 503 and may be retried."""


@dataclass(frozen=True)
class AdapterRecord:
    tenant: str
    name: str
    version: int  # 1, 2, ... per name (what users see)
    revision: int  # store-wide unique id of these bytes (what caches key on)
    method: str  # LORA | DORA | ROAD | SHIRA
    rank: int
    config: str  # adapter_config.json as uploaded
    base_fingerprint: str  # BaseModelShape/weights fingerprint of the base the adapter was validated on
    original_bytes: int  # size of the uploaded adapter_model.safetensors
    stored_bytes: int  # size of what is stored (smaller with the compeft codec)
    sha256: str  # of the uploaded adapter_model.safetensors
    codec: str  # none | compeft
    created: float  # unix time of this version

    def public(self) -> dict:
        out = asdict(self)
        out.pop("revision")
        out["config"] = json.loads(self.config)
        return out

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> AdapterRecord:
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        for key in ("version", "revision", "rank", "original_bytes", "stored_bytes"):
            fields[key] = int(fields[key])
        fields["created"] = float(fields["created"])
        return cls(**fields)


@contextmanager
def unavailable_on_errors() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError) as exc:
        raise StoreUnavailable(f"the adapter store (Redis) is unavailable: {exc}") from exc


def connect(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """A redis-py client with bounded retries (exponential backoff) on connection errors."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError],
        health_check_interval=30,
        socket_read_size=1 << 20,  # adapters are megabytes: large reads (with hiredis, ~0.7 ms per 2 MB)
    )


class AdapterStore:
    def __init__(self, client: redis.Redis, prefix: str = "coserve", retired_blob_ttl_s: int = RETIRED_BLOB_TTL_S):
        self.client = client
        self.prefix = prefix
        self.retired_blob_ttl_s = retired_blob_ttl_s
        self.channel = f"{prefix}:adapter-events"

    # ---- keys ----
    def _record_key(self, tenant: str, name: str) -> str:
        return f"{self.prefix}:adapter:{tenant}:{name}"

    def _index_key(self, tenant: str) -> str:
        return f"{self.prefix}:adapters:{tenant}"

    def _blob_key(self, revision: int) -> str:
        return f"{self.prefix}:blob:{revision}"

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False

    # ---- reads ----
    def get(self, tenant: str, name: str) -> AdapterRecord | None:
        with unavailable_on_errors():
            raw = self.client.hgetall(self._record_key(tenant, name))
        return AdapterRecord.from_hash(raw) if raw else None

    def blob(self, revision: int) -> bytes | None:
        """The stored tensors of one revision (None once a retired revision has expired)."""
        with unavailable_on_errors():
            return self.client.get(self._blob_key(revision))

    def list(self, tenant: str, after: str | None = None, limit: int = 20) -> tuple[list[AdapterRecord], bool]:
        """One page of the tenant's adapters by name, after `after`; and whether more follow."""
        start = f"({after}" if after else "-"
        with unavailable_on_errors():
            names = self.client.zrangebylex(self._index_key(tenant), start, "+", start=0, num=limit + 1)
            pipe = self.client.pipeline(transaction=False)
            for name in names[:limit]:
                pipe.hgetall(self._record_key(tenant, name.decode()))
            raws = pipe.execute()
        return [AdapterRecord.from_hash(r) for r in raws if r], len(names) > limit

    # ---- writes ----
    def put(self, tenant: str, name: str, *, config: bytes, stored: bytes, original_bytes: int, sha256: str,
            method: str, rank: int, base_fingerprint: str, codec: str) -> AdapterRecord:
        """Store a new version of (tenant, name) atomically and announce it; returns the record."""
        key = self._record_key(tenant, name)
        with unavailable_on_errors():
            revision = int(self.client.incr(f"{self.prefix}:revision"))

        def attempt(pipe) -> AdapterRecord:
            old = pipe.hmget(key, "version", "revision")
            version = int(old[0]) + 1 if old[0] else 1
            record = AdapterRecord(tenant, name, version, revision, method, rank, config.decode(),
                                   base_fingerprint, original_bytes, len(stored), sha256, codec, time.time())
            pipe.multi()
            pipe.set(self._blob_key(revision), stored)
            pipe.hset(key, mapping={k: str(v) for k, v in asdict(record).items()})
            pipe.zadd(self._index_key(tenant), {name: 0})
            if old[1]:
                pipe.expire(self._blob_key(int(old[1])), self.retired_blob_ttl_s)
            pipe.publish(self.channel, self._event("put", tenant, name, revision))
            return record

        return watched(self.client, key, attempt)

    def delete(self, tenant: str, name: str) -> bool:
        """Remove (tenant, name); False if it did not exist."""
        key = self._record_key(tenant, name)

        def attempt(pipe) -> bool:
            revision = pipe.hget(key, "revision")
            if revision is None:
                return False
            pipe.multi()
            pipe.delete(key)
            pipe.zrem(self._index_key(tenant), name)
            pipe.expire(self._blob_key(int(revision)), self.retired_blob_ttl_s)
            pipe.publish(self.channel, self._event("delete", tenant, name, int(revision)))
            return True

        return watched(self.client, key, attempt)

    @staticmethod
    def _event(op: str, tenant: str, name: str, revision: int) -> str:
        return json.dumps({"op": op, "tenant": tenant, "name": name, "revision": revision})

    # ---- events ----
    def listen(self, on_event: Callable[[dict], None], stop: threading.Event) -> threading.Thread:
        """Deliver adapter events to `on_event` on a background thread until `stop` is set. After a lost
        connection it resubscribes and delivers {"op": "resync"}: events may have been missed meanwhile."""
        def run() -> None:
            connected_before = False
            while not stop.is_set():
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                try:
                    pubsub.subscribe(self.channel)
                    if connected_before:
                        on_event({"op": "resync"})
                    connected_before = True
                    while not stop.is_set():
                        message = pubsub.get_message(timeout=0.5)
                        if message and message["type"] == "message":
                            on_event(json.loads(message["data"]))
                except (redis.RedisError, OSError) as exc:
                    log.warning("adapter event subscription lost (%s); resubscribing", exc)
                    stop.wait(0.2)
                finally:
                    try:
                        pubsub.close()
                    except (redis.RedisError, OSError):
                        pass

        thread = threading.Thread(target=run, name="coserve-adapter-events", daemon=True)
        thread.start()
        return thread


def watched(client: redis.Redis, key: str, attempt: Callable[[Any], T]) -> T:
    """Optimistic transaction on `key`: attempt(pipe) reads through the pipeline with the key WATCHed, then
    calls pipe.multi() and queues its writes (or returns without multi() to write nothing). EXEC runs
    after it; if another client changed the key in between, the attempt is run again. Returns its value."""
    with unavailable_on_errors(), client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                result = attempt(pipe)
                if pipe.explicit_transaction:
                    pipe.execute()
                else:
                    pipe.unwatch()
                return result
            except redis.WatchError:
                continue


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
