"""Adapters over HTTP: --adapter at start-up, selection by `model`, /v1/models, mixed batches."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.adapters.conftest import make_adapter
from tests.server.conftest import start_server

KINDS = ("lora-all", "dora", "road", "shira")


@pytest.fixture(scope="module")
def adapter_server(demo_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-adapters")
    specs = []
    for i, kind in enumerate(KINDS):
        make_adapter(demo_tiny, kind, root / kind, seed=i)
        specs += ["--adapter", f"{kind}={root / kind}"]
    srv = start_server(demo_tiny, root, "--served-model-name", "demo-tiny", "--dtype", "float32",
                       "--max-loras", "2", *specs)
    yield srv
    srv.stop()


def complete(url: str, model: str, prompt: str = "def main():", **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, **extra}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_models_lists_adapters_with_parent(adapter_server):
    data = httpx.get(adapter_server.url + "/v1/models").json()["data"]
    assert data[0]["id"] == "demo-tiny" and data[0]["parent"] is None
    assert sorted(m["id"] for m in data[1:]) == sorted(KINDS)
    assert all(m["parent"] == "demo-tiny" for m in data[1:])


def test_each_adapter_changes_the_output_and_unknown_is_404(adapter_server):
    url = adapter_server.url
    texts = {name: complete(url, name)["choices"][0]["text"] for name in ("demo-tiny", *KINDS)}
    assert len(set(texts.values())) == len(texts), texts
    resp = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "model"


def test_concurrent_mixed_adapters_equal_their_solo_runs(adapter_server):
    """More adapters than slots (--max-loras 2): requests wait for a slot, none is evicted while in use."""
    url = adapter_server.url
    names = ["demo-tiny", *KINDS, *KINDS]
    solo = {name: complete(url, name, prompt=f"x = {i}")["choices"][0]["text"] for i, name in enumerate(KINDS)}
    solo["demo-tiny"] = complete(url, "demo-tiny", prompt="x = 9")["choices"][0]["text"]

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def one(i, name):
                prompt = "x = 9" if name == "demo-tiny" else f"x = {KINDS.index(name)}"
                body = {"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
                return name, (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            return await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))

    for name, text in asyncio.run(run()):
        assert text == solo[name], name


def test_bad_adapter_at_start_up_is_refused(demo_tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    (bad / "adapter_model.safetensors").write_bytes(b"")
    srv = start_server(demo_tiny, tmp_path, "--adapter", f"bad={bad}", wait_ready=False)
    assert srv.process.wait(60) != 0
    assert "peft_type" in srv.log()


def test_adapter_metrics(adapter_server):
    from prometheus_client.parser import text_string_to_metric_families

    complete(adapter_server.url, "road")
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(adapter_server.url + "/metrics").text)}
    loads = {s.labels["tier"] for s in families["coserve_adapter_load_seconds"].samples if "tier" in s.labels}
    assert "device" in loads  # adapters preloaded at start-up are timed on their way into a slot
    info = families["vllm:lora_requests_info"].samples
    assert len(info) == 1 and info[0].labels["max_lora"] == "2"
