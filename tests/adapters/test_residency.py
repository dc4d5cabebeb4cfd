"""Residency tiers: device slots (LRU, in-use never evicted, pins), host cache, background loads."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from coserve.adapters.registry import HostCache, SlotTable
from coserve.adapters.types import LoadedAdapter
from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.scheduler.request import SamplingParams
from coserve.scheduler.scheduler import RequestRejected
from tests.conftest import run_engine


def test_slot_table_lru_pins_and_users():
    table = SlotTable(2)
    assert table.acquire("a") == (0, True)
    assert table.acquire("b") == (1, True)
    assert table.acquire("a") == (0, False)  # shared, no reload
    assert not table.has_room_for("c")  # both slots in use
    table.release("a")
    table.release("a")
    assert table.has_room_for("c")
    assert table.acquire("c") == (0, True)  # a was idle: evicted
    assert "a" not in table.slot_of
    table.release("b")
    table.pinned.add("b")
    table.release("c")
    assert table.acquire("d") == (0, True)  # b is pinned: c's slot is taken
    assert table.slot_of["b"] == 1


def test_host_cache_loads_in_background_and_evicts_lru():
    gate = threading.Event()
    loads = []

    def source(name):
        def load():
            gate.wait(5)
            loads.append(name)
            return LoadedAdapter(name, "LORA", {})
        return load

    cache = HostCache(capacity=2)
    for name in "abc":
        cache.register(name, source(name))
    cache.prefetch("a")
    assert not cache.ready("a")  # the load runs on the worker thread
    gate.set()
    for name in "bc":
        cache.prefetch(name)
    deadline = time.monotonic() + 5
    while not cache.ready("c") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loads == ["a", "b", "c"]
    assert not cache.ready("a") and cache.ready("b") and cache.ready("c")  # capacity 2: a evicted
    cache.close()


def test_more_adapters_than_slots_all_requests_complete_exactly(hf_llama, llama_adapters):
    names = ["lora-all", "dora", "road", "shira", "lora-patterns"]
    gen = torch.Generator().manual_seed(4)
    prompts = {f"r{i}": (names[i % len(names)], torch.randint(0, 2048, (9,), generator=gen).tolist())
               for i in range(10)}
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    def run(max_loras):
        engine = LLMEngine(EngineConfig(model=str(hf_llama), dtype="float32", max_loras=max_loras,
                                        kv_cache_memory=1 << 23))
        for name in names:
            engine.adapters.register_dir(name, llama_adapters[name], preload=False)  # loaded on first use
        tokens = {}
        for rid, (adapter, prompt) in prompts.items():
            engine.add_request(rid, prompt, params, adapter)
            tokens[rid] = []
        while engine.has_work:
            for out in engine.step():
                for d in out.deltas:
                    tokens[out.request_id].extend(d.token_ids)
            time.sleep(0.001)  # let background loads land
        return tokens, engine

    plenty, _ = run(max_loras=5)
    scarce, engine = run(max_loras=2)
    assert scarce == plenty
    assert all(len(t) == 10 for t in scarce.values())
    assert engine.adapters.slots.users == [0, 0]


def test_unknown_adapter_is_rejected_at_submission(hf_llama):
    engine = LLMEngine(EngineConfig(model=str(hf_llama), dtype="float32", kv_cache_memory=1 << 22))
    assert run_engine(engine, {"x": ([1, 2, 3], SamplingParams(max_tokens=2))})["x"][0]
    with pytest.raises(RequestRejected) as exc:
        engine.add_request("y", [1, 2, 3], SamplingParams(max_tokens=2), "missing")
    assert exc.value.param == "model"
