"""POST /v1/completions, POST /v1/chat/completions, GET /v1/models."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from coserve.engine.engine import RequestOutput
from coserve.engine.tokenizer import ChatTemplateError
from coserve.scheduler.outputs import SampledToken
from coserve.scheduler.request import SamplingParams
from coserve.scheduler.scheduler import RequestRejected
from coserve.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    Usage,
    error_body,
    new_id,
    now,
)
from coserve.server.state import ApiError, ServerState, authorize, server_state

router = APIRouter(dependencies=[Depends(authorize)])
MODELS_PAGE = 200


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """The base model, the shared adapters, and the caller's own stored adapters (never another tenant's)."""
    st = server_state(request)
    tenant = request.state.principal.tenant
    name = st.config.served_model_name
    base = {"object": "model", "created": st.created, "owned_by": "coserve", "max_model_len": st.max_model_len}
    data = [{"id": name, **base, "root": st.engine.engine.info.model_dir, "parent": None}]
    data += [{"id": a, **base, "root": a, "parent": name} for a in sorted(st.shared_adapters)]
    after = None
    while st.store is not None:
        records, more = await asyncio.to_thread(st.store.list, tenant, after, MODELS_PAGE)
        data += [{"id": r.name, **base, "created": int(r.created), "owned_by": tenant, "root": r.name,
                  "parent": name} for r in records]
        if not more or not records:
            break
        after = records[-1].name
    return {"object": "list", "data": data}


# ---- request -> engine ----
def _tokenize_prompts(st: ServerState, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [st.tokenizer.encode(prompt)]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif all(isinstance(p, str) for p in prompt):
        prompts = [st.tokenizer.encode(p) for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    vocab = st.engine.engine.model.config.vocab_size
    for ids in prompts:
        if any(t < 0 or t >= vocab for t in ids):
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
    return prompts


def _sampling_params(st: ServerState, body: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    cfg = st.config
    if body.n > cfg.max_n:
        raise ApiError(400, f"n must be at most {cfg.max_n}", param="n")
    stops = body.stop_list()
    if len(stops) > cfg.max_stop_sequences:
        raise ApiError(400, f"at most {cfg.max_stop_sequences} stop sequences are allowed", param="stop")
    if any(len(s) > cfg.max_stop_length for s in stops):
        raise ApiError(400, f"a stop sequence may have at most {cfg.max_stop_length} characters", param="stop")
    if logprobs is not None and logprobs > cfg.max_top_logprobs:
        param = "top_logprobs" if isinstance(body, ChatCompletionRequest) else "logprobs"
        raise ApiError(400, f"{param} must be at most {cfg.max_top_logprobs}", param=param)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        n=body.n,
        seed=body.seed,
        stop=tuple(stops),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )


def _check_lengths(st: ServerState, prompts: list[list[int]], params: SamplingParams, param_name: str) -> None:
    for ids in prompts:
        if len(ids) >= st.max_model_len:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the context window is {st.max_model_len}",
                           param=param_name)
        try:
            st.engine.engine.check_request(len(ids), params)
        except RequestRejected as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several engine requests; closing this closes (aborts) them all."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Choice:
    text: str = ""
    tokens: list[SampledToken] = field(default_factory=list)
    finish_reason: str | None = None
    role_sent: bool = False


class _Generation:
    """One API call: its prompts, engine streams and the choices being assembled."""

    def __init__(self, st: ServerState, prompts: list[list[int]], params: SamplingParams, request_id: str,
                 adapter: tuple[str | None, Any]):
        self.st, self.prompts, self.params = st, prompts, params
        self.choices = [_Choice() for _ in range(len(prompts) * params.n)]
        streams = [st.engine.generate(f"{request_id}-{i}", p, params, *adapter) for i, p in enumerate(prompts)]
        self.outputs = _merge(streams)
        self.completion_tokens = 0

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        done = sum(len(c.tokens) for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done).model_dump()

    def apply(self, prompt_index: int, out: RequestOutput) -> list[tuple[int, str, list[SampledToken], str | None]]:
        if out.error:
            raise ApiError(500, out.error, "internal_error")
        updates = []
        for d in out.deltas:
            index = prompt_index * self.params.n + d.index
            choice = self.choices[index]
            tokens = d.logprobs if d.logprobs else [SampledToken(t) for t in d.token_ids]
            choice.text += d.text
            choice.tokens.extend(tokens)
            choice.finish_reason = d.finish_reason or choice.finish_reason
            updates.append((index, d.text, tokens, d.finish_reason))
        return updates

    async def run_to_end(self, request: Request) -> None:
        """Consume everything; abort the engine requests if the client goes away meanwhile."""
        async def consume():
            async for i, out in self.outputs:
                self.apply(i, out)

        task = asyncio.create_task(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return
        task.result()


# ---- logprobs formats ----
def _token_text(st: ServerState, token_id: int) -> str:
    return st.tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(st: ServerState, tokens: list[SampledToken], offset: int) -> dict:
    texts = [_token_text(st, t.token_id) for t in tokens]
    offsets, pos = [], offset
    for text in texts:
        offsets.append(pos)
        pos += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{_token_text(st, a.token_id): a.logprob for a in (t.top_logprobs or [])} for t in tokens],
        "text_offset": offsets,
    }


def _chat_logprobs(st: ServerState, tokens: list[SampledToken]) -> dict:
    def entry(token_id: int, logprob: float | None) -> dict:
        text = _token_text(st, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [
        {**entry(t.token_id, t.logprob), "top_logprobs": [entry(a.token_id, a.logprob) for a in t.top_logprobs or []]}
        for t in tokens
    ]}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(gen: _Generation, chunk_for, include_usage: bool, base: dict) -> AsyncIterator[str]:
    try:
        async for i, out in gen.outputs:
            for index, text, tokens, reason in gen.apply(i, out):
                yield _sse({**base, "choices": [chunk_for(index, text, tokens, reason)]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": gen.usage()})
    except ApiError as exc:
        yield _sse(error_body(exc.message, exc.type, exc.param, exc.status))
    except Exception as exc:  # noqa: BLE001 - a stream must end with an error event, never hang
        yield _sse(error_body(f"{type(exc).__name__}: {exc}", "internal_error", None, 500))
    yield _sse("[DONE]")


def _request_id(request: Request) -> str:
    return request.state.request_id if hasattr(request.state, "request_id") else new_id("req")


# ---- routes ----
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = server_state(request)
    adapter = await st.resolve_model(request.state.principal, body.model)
    prompts = _tokenize_prompts(st, body.prompt)
    params = _sampling_params(st, body, body.max_tokens or 16, body.logprobs)
    _check_lengths(st, prompts, params, "prompt")
    st.check_accepting()
    gen = _Generation(st, prompts, params, _request_id(request), adapter)
    base = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": body.model}

    if body.stream:
        def chunk(index, text, tokens, reason):
            lp = _completion_logprobs(st, tokens, len(gen.choices[index].text) - len(text)) \
                if params.logprobs is not None else None
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}

        include = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(gen, chunk, include, base), media_type="text/event-stream")

    await gen.run_to_end(request)
    choices = []
    for index, c in enumerate(gen.choices):
        prompt_text = st.tokenizer.decode(prompts[index // params.n]) if body.echo else ""
        lp = _completion_logprobs(st, c.tokens, len(prompt_text)) if params.logprobs is not None else None
        choices.append({"index": index, "text": prompt_text + c.text, "logprobs": lp,
                        "finish_reason": c.finish_reason or "abort"})
    return JSONResponse({**base, "choices": choices, "usage": gen.usage()})


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = server_state(request)
    adapter = await st.resolve_model(request.state.principal, body.model)
    try:
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in body.messages]
        prompt = st.tokenizer.encode_chat(messages)
    except (ChatTemplateError, ValueError) as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    top = body.top_logprobs if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    room = max(st.max_model_len - len(prompt), 1)
    max_tokens = body.max_completion_tokens or body.max_tokens or room
    params = _sampling_params(st, body, max_tokens, (top or 0) if body.logprobs else None)
    _check_lengths(st, [prompt], params, "messages")
    st.check_accepting()
    gen = _Generation(st, [prompt], params, _request_id(request), adapter)
    base = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": body.model}

    if body.stream:
        def chunk(index, text, tokens, reason):
            choice = gen.choices[index]
            delta: dict[str, Any] = {"content": text} if text or not reason else {}
            if not choice.role_sent:
                delta = {"role": "assistant", "content": text}
                choice.role_sent = True
            lp = _chat_logprobs(st, tokens) if body.logprobs else None
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}

        include = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(gen, chunk, include, base), media_type="text/event-stream")

    await gen.run_to_end(request)
    choices = [{
        "index": i,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": _chat_logprobs(st, c.tokens) if body.logprobs else None,
        "finish_reason": c.finish_reason or "abort",
    } for i, c in enumerate(gen.choices)]
    return JSONResponse({**base, "object": "chat.completion", "choices": choices, "usage": gen.usage()})
