"""The engine thread and its asyncio face: concurrent streams, abort, rejection, failure isolation."""

from __future__ import annotations

import asyncio

import pytest

from coserve.engine.async_engine import AsyncEngine
from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.scheduler.request import SamplingParams
from coserve.scheduler.scheduler import RequestRejected
from tests.conftest import run_engine


@pytest.fixture
def engine(demo_tiny):
    eng = AsyncEngine(LLMEngine(EngineConfig(model=str(demo_tiny), dtype="float32", kv_cache_memory=1 << 24)))
    eng.start()
    yield eng
    eng.stop()


async def collect(engine, rid, prompt, params):
    tokens, text, reason = [], "", None
    async for out in engine.generate(rid, prompt, params):
        for d in out.deltas:
            tokens += d.token_ids
            text += d.text
            reason = d.finish_reason or reason
    return tokens, text, reason


def test_concurrent_streams_match_sequential_runs(engine, demo_tiny):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = {f"r{i}": list(range(5 + i, 15 + 3 * i)) for i in range(6)}

    async def run_all():
        return await asyncio.gather(*(collect(engine, rid, p, params) for rid, p in prompts.items()))

    results = asyncio.run(run_all())
    solo = LLMEngine(EngineConfig(model=str(demo_tiny), dtype="float32", kv_cache_memory=1 << 24))
    for (rid, prompt), (tokens, text, reason) in zip(prompts.items(), results):
        ref = run_engine(solo, {rid: (prompt, params)})[rid][0]
        assert tokens == ref and reason == "length"
        assert text == solo.tokenizer.decode(ref)


def test_leaving_early_aborts_and_frees_blocks(engine):
    params = SamplingParams(max_tokens=1000, ignore_eos=True)

    async def leave_after_three():
        seen = 0
        async for _ in engine.generate("leaver", [1, 2, 3], params):
            seen += 1
            if seen == 3:
                break
        for _ in range(100):
            if engine.engine.blocks.usage == 0 and not engine.engine.has_work:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(leave_after_three())
    assert engine.num_active == 0


def test_rejects_requests_that_cannot_fit(engine):
    async def too_long():
        async for _ in engine.generate("big", [1] * 10, SamplingParams(max_tokens=5000)):
            pass

    with pytest.raises(RequestRejected) as exc:
        asyncio.run(too_long())
    assert exc.value.param == "max_tokens"


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    real = engine.engine.runner.execute
    calls = {"n": 0}

    def flaky(step, train=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(step, train)

    monkeypatch.setattr(engine.engine.runner, "execute", flaky)

    async def run():
        failed = [out async for out in engine.generate("a", [1, 2, 3], SamplingParams(max_tokens=4))]
        ok = await collect(engine, "b", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
        return failed, ok

    failed, ok = asyncio.run(run())
    assert failed[-1].error and "injected fault" in failed[-1].error
    assert failed[-1].deltas[0].finish_reason == "abort"
    assert len(ok[0]) == 4 and engine.alive
