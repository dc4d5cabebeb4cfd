"""Every error case over raw HTTP: status, error shape and the named field."""

from __future__ import annotations

import httpx
import pytest

BASE = {"model": "demo-tiny", "prompt": "hello", "max_tokens": 4}


def post(server, path: str, body=None, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30, **kw)


def assert_error(resp: httpx.Response, status: int, param: str | None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["param"] == param
    assert resp.headers["x-request-id"]
    return err


@pytest.mark.parametrize("patch,param", [
    ({"n": 100}, "n"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}, "stop"),
    ({"stop": ["x" * 300]}, "stop"),
    ({"logprobs": 50}, "logprobs"),
    ({"temperature": 3.0}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"prompt": "word " * 3000}, "prompt"),
    ({"prompt": [999999]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"seed": -1}, "seed"),
])
def test_completion_limits_answer_400_naming_the_field(server, patch, param):
    assert_error(post(server, "/v1/completions", {**BASE, **patch}), 400, param)


def test_chat_limits(server):
    chat = {"model": "demo-tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(server, "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 99}), 400,
                 "top_logprobs")
    assert_error(post(server, "/v1/chat/completions", {**chat, "messages": []}), 400, "messages")
    assert_error(post(server, "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}),
                 400, "messages.0.role")
    assert_error(post(server, "/v1/chat/completions", {**chat, "max_tokens": 4000}), 400, "max_tokens")


def test_unknown_model_is_404(server):
    err = assert_error(post(server, "/v1/completions", {**BASE, "model": "nope"}), 404, "model")
    assert "nope" in err["message"]


def test_missing_field_and_bad_json(server):
    assert_error(post(server, "/v1/completions", {"model": "demo-tiny"}), 400, "prompt")
    headers = {"content-type": "application/json"}
    resp = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=headers)
    assert resp.status_code == 400 and "error" in resp.json()


def test_body_too_large_is_413(server):
    big = {**BASE, "prompt": "x" * (5 * 2**20)}
    assert_error(post(server, "/v1/completions", big), 413, None)


def test_server_still_serves_after_bad_requests(server):
    for _ in range(5):
        post(server, "/v1/completions", {**BASE, "n": 1000})
    ok = post(server, "/v1/completions", BASE)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
