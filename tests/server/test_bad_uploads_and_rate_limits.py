"""Bad uploads each get a 4xx naming the problem and leave no key in Redis while good traffic goes on;
per-tenant rate limits answer 429 + Retry-After without slowing other tenants."""

from __future__ import annotations

import json
import pickle
import threading
import time

import httpx
import pytest
import redis
import torch
from safetensors.torch import load as load_st
from safetensors.torch import save as save_st

from tests.adapters.conftest import make_adapter
from tests.server.conftest import start_server
from tests.server.store_helpers import auth, complete, tar_gz, upload, upload_files, write_keys

KEYS = {"good-key": ("good", "user"), "noisy-key": ("noisy", "user")}


@pytest.fixture(scope="module")
def lora_dir(demo_tiny, tmp_path_factory):
    return make_adapter(demo_tiny, "lora-all", tmp_path_factory.mktemp("bad-uploads") / "lora")


@pytest.fixture(scope="module")
def guarded_server(demo_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("guarded")
    keys = write_keys(root / "keys.yaml", KEYS, rates={"noisy-key": 2.0})
    srv = start_server(demo_tiny, root, "--served-model-name", "demo-tiny", "--api-keys-file", str(keys),
                       "--rate-limit-burst", "4", "--max-upload-bytes", "2MiB")
    yield srv
    srv.stop()


def bad_uploads(lora_dir) -> dict[str, tuple[dict[str, bytes], int, str]]:
    """case -> (files, expected status, expected param or text in the error)."""
    config = (lora_dir / "adapter_config.json").read_bytes()
    weights = (lora_dir / "adapter_model.safetensors").read_bytes()
    tensors = load_st(weights)
    key = sorted(tensors)[0]
    wrong_shape = {**tensors, key: torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)}
    with_nan = {**tensors, key: tensors[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))}
    pickled = pickle.dumps({"a": 1}, protocol=4)
    huge_header = (10**9).to_bytes(8, "little") + b"{}"
    return {
        "pickle": ({"adapter_config.json": config, "adapter_model.bin": pickled}, 422, "adapter_model.bin"),
        "renamed pickle": ({"adapter_config.json": config, "adapter_model.safetensors": pickled}, 422,
                           "adapter_model.safetensors"),
        "malformed header": ({"adapter_config.json": config, "adapter_model.safetensors": huge_header}, 422,
                             "adapter_model.safetensors"),
        "truncated": ({"adapter_config.json": config, "adapter_model.safetensors": weights[: len(weights) // 2]},
                      422, "adapter_model.safetensors"),
        "wrong shape": ({"adapter_config.json": config, "adapter_model.safetensors": save_st(wrong_shape)}, 422,
                        key),
        "nan": ({"adapter_config.json": config, "adapter_model.safetensors": save_st(with_nan)}, 422, key),
        "unknown config key": ({"adapter_config.json": json.dumps({**json.loads(config), "evil": 1}).encode(),
                                "adapter_model.safetensors": weights}, 422, "evil"),
        "traversal in archive": ({"a.tar.gz": tar_gz({"../../adapter_config.json": config,
                                                    "adapter_model.safetensors": weights})}, 422, "archive"),
        "archive unpacking too large": ({"a.tar.gz": tar_gz({"adapter_config.json": config,
                                                           "adapter_model.safetensors": b"\0" * (3 << 20)})},
                                        422, "archive"),
        "body too large": ({"a.tar.gz": bytes(3 << 20)}, 413, "exceeds"),
    }


def _store_keys(srv) -> set[bytes]:
    client = redis.Redis(unix_socket_path=str(srv.data_dir / "redis" / "redis.sock"))
    return set(client.keys("*"))


def test_bad_uploads_get_4xx_and_leave_no_trace_while_good_traffic_succeeds(guarded_server, lora_dir):
    url = guarded_server.url
    assert upload(url, "good-key", "ok", lora_dir).status_code == 201
    before = _store_keys(guarded_server)
    failures, stop = [], threading.Event()

    def good_traffic():
        while not stop.is_set():
            resp = complete(url, "good-key", "ok", max_tokens=4)
            if resp.status_code != 200:
                failures.append(resp.text)

    worker = threading.Thread(target=good_traffic)
    worker.start()
    try:
        for case, (files, status, expect) in bad_uploads(lora_dir).items():
            resp = upload_files(url, "good-key", f"bad-{case.replace(' ', '-')}", files)
            assert resp.status_code == status, (case, resp.text)
            error = resp.json()["error"]
            assert expect == error["param"] or expect in error["message"], (case, error)
        for name in ("../etc", "a/b", "x" * 200, ""):
            resp = upload(url, "good-key", name, lora_dir)
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "name", name
    finally:
        stop.set()
        worker.join()
    assert not failures
    assert _store_keys(guarded_server) == before  # nothing stored by any refused upload
    assert complete(url, "good-key", "ok").status_code == 200


def test_rate_limit_is_per_tenant(guarded_server):
    url = guarded_server.url
    codes: dict[str, list[int]] = {"noisy-key": [], "good-key": []}
    retry_after = []

    def hammer(key: str, n: int):
        for _ in range(n):
            resp = httpx.get(url + "/v1/models", headers=auth(key), timeout=30)
            codes[key].append(resp.status_code)
            if resp.status_code == 429:
                retry_after.append(int(resp.headers["retry-after"]))
                assert resp.json()["error"]["type"] == "rate_limit_error"

    threads = [threading.Thread(target=hammer, args=("noisy-key", 30)),
               threading.Thread(target=hammer, args=("good-key", 30))]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    allowed = 4 + 2.0 * elapsed  # the burst plus the refill over the run
    assert codes["noisy-key"].count(200) <= allowed + 1 and codes["noisy-key"].count(429) >= 30 - allowed - 1
    assert codes["good-key"] == [200] * 30  # the other tenant is not limited by the noisy one
    assert retry_after and all(r >= 1 for r in retry_after)
