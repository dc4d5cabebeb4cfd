"""The Redis adapter store on a real redis-server: versions, paging, deletes, events, persistence."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from coserve.adapters.embedded_redis import EmbeddedRedis
from coserve.adapters.store import AdapterStore, connect, sha256_hex


@pytest.fixture
def store(redis_server):
    client = connect(redis_server.url)
    yield AdapterStore(client, prefix=f"t{uuid.uuid4().hex[:8]}", retired_blob_ttl_s=60)
    client.close()


def put(store: AdapterStore, tenant: str, name: str, payload: bytes = b"weights"):
    return store.put(tenant, name, config=json.dumps({"peft_type": "LORA"}).encode(), stored=payload,
                     original_bytes=len(payload), sha256=sha256_hex(payload), method="LORA", rank=4,
                     base_fingerprint="f" * 16, codec="none")


def test_versions_are_atomic_records_and_old_blobs_expire(store):
    first = put(store, "acme", "bot", b"v1")
    second = put(store, "acme", "bot", b"v2")
    assert (first.version, second.version) == (1, 2) and second.revision != first.revision
    current = store.get("acme", "bot")
    assert current == second and store.blob(current.revision) == b"v2"
    assert store.blob(first.revision) == b"v1"  # still there for requests that resolved it just before
    assert 0 < store.client.ttl(store._blob_key(first.revision)) <= 60
    assert store.client.ttl(store._blob_key(second.revision)) == -1  # the current one never expires
    assert current.sha256 == sha256_hex(b"v2") and current.public()["config"] == {"peft_type": "LORA"}


def test_tenants_are_separate_namespaces(store):
    put(store, "acme", "bot", b"acme's")
    assert store.get("globex", "bot") is None
    assert store.list("globex") == ([], False)
    put(store, "globex", "bot", b"globex's")
    assert store.blob(store.get("acme", "bot").revision) == b"acme's"
    assert store.blob(store.get("globex", "bot").revision) == b"globex's"


def test_list_pages_by_name(store):
    names = [f"a{i:02d}" for i in range(7)]
    for name in reversed(names):
        put(store, "acme", name)
    seen, after, pages = [], None, 0
    while True:
        records, more = store.list("acme", after, limit=3)
        seen += [r.name for r in records]
        pages += 1
        if not more:
            break
        after = records[-1].name
    assert seen == names and pages == 3


def test_delete_removes_record_and_index_and_reports_missing(store):
    record = put(store, "acme", "bot")
    assert store.delete("acme", "bot") is True
    assert store.get("acme", "bot") is None and store.list("acme") == ([], False)
    assert 0 < store.client.ttl(store._blob_key(record.revision)) <= 60
    assert store.delete("acme", "bot") is False
    again = put(store, "acme", "bot")
    assert again.version == 1 and again.revision > record.revision  # a revision never names other bytes


def test_concurrent_puts_give_distinct_versions(store):
    def worker():
        for _ in range(10):
            put(store, "acme", "hot")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("acme", "hot").version == 40


def test_events_reach_listeners(store):
    events, stop = [], threading.Event()
    store.listen(events.append, stop)
    time.sleep(0.3)  # subscribed
    record = put(store, "acme", "bot")
    store.delete("acme", "bot")
    deadline = time.monotonic() + 5
    while len(events) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    assert events == [
        {"op": "put", "tenant": "acme", "name": "bot", "revision": record.revision},
        {"op": "delete", "tenant": "acme", "name": "bot", "revision": record.revision},
    ]


def test_records_survive_a_restart_of_the_embedded_server(tmp_path):
    with EmbeddedRedis(tmp_path / "data") as server:
        store = AdapterStore(connect(server.url))
        record = put(store, "acme", "bot", b"persisted")
    with EmbeddedRedis(tmp_path / "data") as server:
        store = AdapterStore(connect(server.url))
        assert store.get("acme", "bot") == record
        assert store.blob(record.revision) == b"persisted"
