"""The official openai SDK against a live coserve server."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_models_lists_the_base_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["demo-tiny"]
    assert models[0].model_extra["max_model_len"] == 2048


def test_completion_text_and_usage(client, demo_tiny):
    from coserve.engine.tokenizer import ModelTokenizer

    tok = ModelTokenizer.from_dir(demo_tiny)
    out = client.completions.create(model="demo-tiny", prompt="def main():", max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == len(tok.encode("def main():"))
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_greedy_is_deterministic_and_seed_reproducible(client):
    a = client.completions.create(model="demo-tiny", prompt="import os", max_tokens=10, temperature=0)
    b = client.completions.create(model="demo-tiny", prompt="import os", max_tokens=10, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    s1 = client.completions.create(model="demo-tiny", prompt="class A:", max_tokens=16, temperature=1.0, seed=7)
    s2 = client.completions.create(model="demo-tiny", prompt="class A:", max_tokens=16, temperature=1.0, seed=7)
    s3 = client.completions.create(model="demo-tiny", prompt="class A:", max_tokens=16, temperature=1.0, seed=8)
    assert s1.choices[0].text == s2.choices[0].text
    assert s1.choices[0].text != s3.choices[0].text


def test_n_greater_than_one_gives_distinct_choices(client):
    out = client.completions.create(model="demo-tiny", prompt="for i in", max_tokens=8, n=3, temperature=1.0,
                                    seed=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.completion_tokens == 3 * 8


def test_streaming_chat_with_usage(client):
    stream = client.chat.completions.create(
        model="demo-tiny", messages=[{"role": "user", "content": "Say something"}], max_tokens=10, stream=True,
        stream_options={"include_usage": True}, temperature=0,
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    full = client.chat.completions.create(
        model="demo-tiny", messages=[{"role": "user", "content": "Say something"}], max_tokens=10, temperature=0
    )
    assert full.choices[0].message.content == content


def test_stop_string_ends_and_is_not_returned(client):
    base = client.completions.create(model="demo-tiny", prompt="Hello", max_tokens=24, temperature=0)
    text = base.choices[0].text
    stop = next((text[i : i + 3] for i in range(3, len(text) - 3) if text[i : i + 3].strip()), None)
    assert stop is not None, text
    out = client.completions.create(model="demo-tiny", prompt="Hello", max_tokens=24, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(
            model="demo-tiny", prompt="Hello", max_tokens=24, temperature=0, stop=[stop], stream=True)
    )
    assert streamed == out.choices[0].text


def test_logprobs_match_a_recomputation(client):
    out = client.chat.completions.create(model="demo-tiny", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.logprob <= 0
    comp = client.completions.create(model="demo-tiny", prompt="x = 1", max_tokens=3, temperature=0, logprobs=2)
    assert len(comp.choices[0].logprobs.tokens) == 3
    assert all(len(t) == 2 for t in comp.choices[0].logprobs.top_logprobs)


def test_penalties_change_the_output(client):
    plain = client.completions.create(model="demo-tiny", prompt="a a a a", max_tokens=20, temperature=0)
    penalised = client.completions.create(model="demo-tiny", prompt="a a a a", max_tokens=20, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.choices[0].text != penalised.choices[0].text


def test_every_response_has_a_request_id(server):
    r = httpx.get(server.url + "/v1/models")
    assert r.headers["x-request-id"]
    r = httpx.get(server.url + "/v1/models", headers={"x-request-id": "mine-123"})
    assert r.headers["x-request-id"] == "mine-123"
