"""Metrics parsed with prometheus_client, client disconnects, queue limits and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import start_server, wait_for


def scrape(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if "finished_reason" in sample.labels:
                key += f"[{sample.labels['finished_reason']}]"
            values[key] = values.get(key, 0.0) + sample.value
    return values


def test_metrics_names_and_counts(server):
    before = scrape(server)
    httpx.post(server.url + "/v1/completions",
               json={"model": "demo-tiny", "prompt": "a b c", "max_tokens": 5, "ignore_eos": True}, timeout=30)
    after = scrape(server)
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "coserve_num_requests_running", "coserve_num_requests_waiting", "coserve_kv_cache_usage_perc",
                 "coserve_time_to_first_token_seconds_count", "coserve_inter_token_latency_seconds_count",
                 "coserve_e2e_request_latency_seconds_count", "coserve_request_queue_time_seconds_count",
                 "coserve_step_time_seconds_count", "coserve_tokens_per_step_count"):
        assert name in after, name
    assert after["coserve_generation_tokens_total"] - before.get("coserve_generation_tokens_total", 0) == 5
    assert after["coserve_prompt_tokens_total"] - before.get("coserve_prompt_tokens_total", 0) >= 3
    assert after["coserve_requests_finished_total[length]"] - before.get("coserve_requests_finished_total[length]",
                                                                         0) == 1
    assert after["coserve_inter_token_latency_seconds_count"] - before["coserve_inter_token_latency_seconds_count"] == 4
    assert after["vllm:num_requests_running"] == 0


def test_stream_disconnect_aborts_and_frees_blocks(server):
    before = scrape(server).get("coserve_requests_finished_total[abort]", 0)
    body = {"model": "demo-tiny", "prompt": "go", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert scrape(server)["coserve_kv_cache_usage_perc"] > 0
    assert wait_for(lambda: scrape(server).get("coserve_requests_finished_total[abort]", 0) == before + 1)
    assert wait_for(lambda: scrape(server)["coserve_kv_cache_usage_perc"] == 0.0)
    assert scrape(server)["vllm:num_requests_running"] == 0


def test_non_streaming_disconnect_aborts(server):
    before = scrape(server).get("coserve_requests_finished_total[abort]", 0)
    body = {"model": "demo-tiny", "prompt": "go", "max_tokens": 1900, "ignore_eos": True}
    try:
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    except httpx.ReadTimeout:
        pass
    assert wait_for(lambda: scrape(server).get("coserve_requests_finished_total[abort]", 0) == before + 1)
    assert wait_for(lambda: scrape(server)["coserve_kv_cache_usage_perc"] == 0.0)


def test_queue_full_answers_503_and_queued_requests_complete(demo_tiny, tmp_path):
    srv = start_server(demo_tiny, tmp_path, "--max-num-seqs", "1", "--max-queued-requests", "1",
                       "--served-model-name", "demo-tiny")
    try:
        async def scenario():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                long = {"model": "demo-tiny", "prompt": "a", "max_tokens": 1500, "ignore_eos": True}
                running = asyncio.create_task(client.post("/v1/completions", json=long))
                await asyncio.sleep(0.3)
                queued = asyncio.create_task(client.post("/v1/completions", json={**long, "max_tokens": 5}))
                await asyncio.sleep(0.3)
                rejected = await client.post("/v1/completions", json=long)
                return rejected, await running, await queued

        rejected, running, queued = asyncio.run(scenario())
        assert rejected.status_code == 503
        assert rejected.headers["retry-after"]
        assert rejected.json()["error"]["type"] == "service_unavailable"
        assert running.status_code == 200 and running.json()["usage"]["completion_tokens"] == 1500
        assert queued.status_code == 200 and queued.json()["usage"]["completion_tokens"] == 5
    finally:
        srv.stop()


def test_sigterm_drains_then_aborts_and_exits(demo_tiny, tmp_path):
    srv = start_server(demo_tiny, tmp_path, "--shutdown-timeout", "2", "--served-model-name", "demo-tiny")
    results: dict[str, object] = {}

    def stream_long():
        body = {"model": "demo-tiny", "prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        reasons = []
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    if choice["finish_reason"]:
                        reasons.append(choice["finish_reason"])
        results["long"] = reasons

    def short():  # in flight at SIGTERM, done well within the drain timeout
        r = httpx.post(srv.url + "/v1/completions",
                       json={"model": "demo-tiny", "prompt": "y", "max_tokens": 150, "ignore_eos": True}, timeout=60)
        results["short"] = r.json()["choices"][0]["finish_reason"]

    threads = [threading.Thread(target=stream_long), threading.Thread(target=short)]
    for t in threads:
        t.start()
    time.sleep(0.25)
    srv.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: httpx.get(srv.url + "/ready").status_code == 503, timeout=1.0)
    refused = httpx.post(srv.url + "/v1/completions", json={"model": "demo-tiny", "prompt": "z", "max_tokens": 2})
    assert refused.status_code == 503
    for t in threads:
        t.join(30)
    assert srv.process.wait(30) == 0
    assert results["long"] == ["abort"]
    assert results["short"] == "length"
