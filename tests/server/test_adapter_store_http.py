"""/v1/adapters on a live server with the embedded Redis store and API keys: uploads served at once
(equal to transformers + peft), versions, paging, download into peft, delete, tenants, admin routes."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.adapters.conftest import make_adapter
from tests.server.conftest import start_server
from tests.server.store_helpers import (
    auth,
    complete,
    completion_text,
    extract_tar,
    peft_text,
    upload,
    write_keys,
)

KEYS = {"acme-key": ("acme", "user"), "globex-key": ("globex", "user"), "root-key": ("ops", "admin")}


@pytest.fixture(scope="module")
def adapters(demo_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("store-adapters")
    return {
        "lora": make_adapter(demo_tiny, "lora-all", root / "lora", seed=1),
        "lora-v2": make_adapter(demo_tiny, "lora-all", root / "lora-v2", seed=2),
        "dora": make_adapter(demo_tiny, "dora", root / "dora", seed=3),
        "road": make_adapter(demo_tiny, "road", root / "road", seed=4),
        "shira": make_adapter(demo_tiny, "shira", root / "shira", seed=5),
    }


@pytest.fixture(scope="module")
def store_server(demo_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("store-srv")
    keys_file = write_keys(root / "keys.yaml", KEYS)
    srv = start_server(demo_tiny, root, "--served-model-name", "demo-tiny", "--dtype", "float32",
                       "--max-loras", "2", "--api-keys-file", str(keys_file))
    srv.keys_file = keys_file
    yield srv
    srv.stop()


def test_keys_are_required_and_checked(store_server):
    url = store_server.url
    assert complete(url, None, "demo-tiny").status_code == 401
    resp = complete(url, "wrong", "demo-tiny")
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    assert complete(url, "acme-key", "demo-tiny").status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_uploaded_adapters_are_served_at_once_and_equal_peft(store_server, adapters, demo_tiny):
    url = store_server.url
    for kind in ("lora", "dora", "road", "shira"):
        resp = upload(url, "acme-key", f"acme-{kind}", adapters[kind])
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert body["id"] == f"acme-{kind}" and body["version"] == 1 and body["tenant"] == "acme"
        assert body["original_bytes"] == (adapters[kind] / "adapter_model.safetensors").stat().st_size
        assert completion_text(url, "acme-key", f"acme-{kind}") == peft_text(demo_tiny, adapters[kind]), kind
    models = httpx.get(url + "/v1/models", headers=auth("acme-key")).json()["data"]
    listed = {m["id"]: m["parent"] for m in models}
    assert all(listed[f"acme-{k}"] == "demo-tiny" for k in ("lora", "dora", "road", "shira"))


def test_new_version_replaces_the_old_and_a_running_request_finishes_on_it(store_server, adapters, demo_tiny):
    url = store_server.url
    assert upload(url, "acme-key", "bot", adapters["lora"]).status_code == 201
    v1_text = peft_text(demo_tiny, adapters["lora"])
    body = {"model": "bot", "prompt": [5, 17, 42, 99, 7], "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth("acme-key"), timeout=60) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))  # the request is running on v1
        resp2 = upload(url, "acme-key", "bot", adapters["lora-v2"])
        assert resp2.status_code == 201 and resp2.json()["version"] == 2
        rest = [line for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest]
                       if json.loads(line[6:])["choices"])
    assert streamed == v1_text
    assert completion_text(url, "acme-key", "bot") == peft_text(demo_tiny, adapters["lora-v2"])
    record = httpx.get(url + "/v1/adapters/bot", headers=auth("acme-key")).json()
    assert record["version"] == 2 and record["method"] == "LORA"


def test_list_pages_get_and_delete(store_server, adapters):
    url, key = store_server.url, "globex-key"
    for i in range(5):
        assert upload(url, key, f"page-{i}", adapters["shira"]).status_code == 201
    names, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = httpx.get(url + "/v1/adapters", params=params, headers=auth(key)).json()
        names += [a["id"] for a in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert names == [f"page-{i}" for i in range(5)]
    resp = httpx.delete(url + "/v1/adapters/page-3", headers=auth(key))
    assert resp.status_code == 200 and resp.json()["deleted"] is True
    for call in (lambda: complete(url, key, "page-3"),
                 lambda: httpx.get(url + "/v1/adapters/page-3", headers=auth(key)),
                 lambda: httpx.get(url + "/v1/adapters/page-3/download", headers=auth(key)),
                 lambda: httpx.delete(url + "/v1/adapters/page-3", headers=auth(key))):
        assert call().status_code == 404
    assert httpx.get(url + "/v1/adapters", params={"limit": 0}, headers=auth(key)).status_code == 400


def test_download_loads_in_peft_with_the_uploaded_weights(store_server, adapters, tmp_path):
    url = store_server.url
    assert upload(url, "acme-key", "dl", adapters["dora"]).status_code == 201
    resp = httpx.get(url + "/v1/adapters/dl/download", headers=auth("acme-key"))
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/gzip"
    folder = extract_tar(resp.content, tmp_path)
    original = load_file(adapters["dora"] / "adapter_model.safetensors")
    downloaded = load_file(folder / "adapter_model.safetensors")
    assert original.keys() == downloaded.keys() and all(torch.equal(original[k], downloaded[k]) for k in original)
    base = AutoModelForCausalLM.from_pretrained(store_server.model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, folder)  # peft loads it


def test_compeft_upload_is_smaller_and_served_as_decoded(store_server, adapters, tmp_path, demo_tiny):
    url = store_server.url
    resp = upload(url, "acme-key", "small", adapters["lora"], codec="compeft", compeft_density="0.1")
    assert resp.status_code == 201, resp.text
    record = resp.json()
    # tiny tensors: safetensors headers dominate (the codec test shows > 20x on real-sized tensors)
    assert record["codec"] == "compeft" and record["original_bytes"] / record["stored_bytes"] > 3
    folder = extract_tar(httpx.get(url + "/v1/adapters/small/download", headers=auth("acme-key")).content, tmp_path)
    decoded = load_file(folder / "adapter_model.safetensors")
    for key, tensor in decoded.items():  # ternary: {-s, 0, +s} with ~10% non-zero
        assert len(tensor.unique()) <= 3 and 0.05 < float((tensor != 0).float().mean()) < 0.15, key
    assert completion_text(url, "acme-key", "small") == peft_text(demo_tiny, folder)
    bad = upload(url, "acme-key", "bad-codec", adapters["road"], codec="compeft")
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "codec"


def test_another_tenants_adapter_looks_missing(store_server, adapters):
    url = store_server.url
    assert upload(url, "acme-key", "secret", adapters["lora"]).status_code == 201
    assert complete(url, "acme-key", "secret").status_code == 200  # now resident in the engine
    for name in ("secret", "never-existed"):
        use = complete(url, "globex-key", name)
        get = httpx.get(url + f"/v1/adapters/{name}", headers=auth("globex-key"))
        dl = httpx.get(url + f"/v1/adapters/{name}/download", headers=auth("globex-key"))
        rm = httpx.delete(url + f"/v1/adapters/{name}", headers=auth("globex-key"))
        assert [r.status_code for r in (use, get, dl, rm)] == [404] * 4
        if name == "secret":
            bodies = [r.json()["error"] | {"message": r.json()["error"]["message"].replace(name, "X")}
                      for r in (use, get, dl, rm)]
        else:
            assert bodies == [r.json()["error"] | {"message": r.json()["error"]["message"].replace(name, "X")}
                              for r in (use, get, dl, rm)]
    listed = [m["id"] for m in httpx.get(url + "/v1/models", headers=auth("globex-key")).json()["data"]]
    assert "secret" not in listed
    assert complete(url, "acme-key", "secret").status_code == 200  # untouched for its owner


def test_revoked_key_fails_on_its_next_request(store_server):
    url = store_server.url
    keys = {**KEYS, "temp-key": ("acme", "user")}
    write_keys(store_server.keys_file, keys)
    assert complete(url, "temp-key", "demo-tiny", max_tokens=1).status_code == 200
    write_keys(store_server.keys_file, KEYS)
    assert complete(url, "temp-key", "demo-tiny", max_tokens=1).status_code == 401
    assert complete(url, "acme-key", "demo-tiny", max_tokens=1).status_code == 200


def test_vllm_runtime_endpoints_need_admin_and_serve_every_tenant(store_server, adapters, demo_tiny):
    url = store_server.url
    body = {"lora_name": "shared-road", "lora_path": str(adapters["road"])}
    resp = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=auth("acme-key"))
    assert resp.status_code == 403
    resp = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=auth("root-key"))
    assert resp.status_code == 200, resp.text
    expect = peft_text(demo_tiny, adapters["road"])
    assert completion_text(url, "acme-key", "shared-road") == expect
    assert completion_text(url, "globex-key", "shared-road") == expect
    again = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=auth("root-key"))
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    missing = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"},
                         headers=auth("root-key"))
    assert missing.status_code == 404
    resp = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "shared-road"},
                      headers=auth("root-key"))
    assert resp.status_code == 200
    assert complete(url, "acme-key", "shared-road").status_code == 404
