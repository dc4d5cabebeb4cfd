"""Token sampling: penalties, temperature, top-k, top-p, seeded generators, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coserve.scheduler.outputs import SampledToken, TokenLogprob
from coserve.scheduler.request import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    output_token_ids: list[int]  # for presence/frequency penalties
    generator: torch.Generator | None  # seeded per sequence, or None for the shared one


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """logits [R, V] -> logits - frequency * count - presence * (count > 0), per row (OpenAI semantics)."""
    for i, row in enumerate(rows):
        p = row.params
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            ids = torch.tensor(row.output_token_ids, dtype=torch.long)
            counts = torch.bincount(ids, minlength=logits.shape[1])[: logits.shape[1]].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits [R, V] outside each row's top_k ([R], 0 = off) and top_p nucleus ([R]) with -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    ranks = torch.arange(vocab)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability mass strictly ahead of each token
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R]: each row's first maximal index (as argmax). For bfloat16 and float16 through max(),
    which PyTorch's CPU kernels vectorize while argmax does not (64 x 49,152 bf16 logits: 1.0 vs 5.8 ms)."""
    return logits.argmax(-1) if logits.dtype == torch.float32 else logits.max(-1).indices


def sample(logits: torch.Tensor, rows: list[SampleRow], default_generator: torch.Generator) -> list[SampledToken]:
    """logits [R, V] (float32 or the model's compute dtype), one row per sampling sequence -> one
    SampledToken per row. Log-probabilities, penalties and sampling run in float32; a greedy choice
    without penalties picks from the logits as they are (greedy_choice; exact: the upcast keeps every
    value and their order)."""
    want_logprobs = [r.params.logprobs is not None for r in rows]
    # of the model's raw distribution
    raw_logprobs = logits.float().log_softmax(-1) if any(want_logprobs) else None
    if any(r.params.presence_penalty or r.params.frequency_penalty for r in rows):
        logits = apply_penalties(logits.to(torch.float32, copy=True), rows)
    chosen = greedy_choice(logits)  # [R]
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows)
        sub = logits[idx].float() / torch.tensor([rows[i].params.temperature for i in random_rows])[:, None]
        top_k = torch.tensor([rows[i].params.top_k for i in random_rows])
        top_p = torch.tensor([rows[i].params.top_p for i in random_rows], dtype=sub.dtype)
        probs = top_k_top_p_filter(sub, top_k, top_p).softmax(-1)  # [Rr, V]
        for j, i in enumerate(random_rows):
            gen = rows[i].generator or default_generator
            chosen[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
    results = []
    for i, row in enumerate(rows):
        token = int(chosen[i])
        if raw_logprobs is None or row.params.logprobs is None:
            results.append(SampledToken(token))
            continue
        lp = raw_logprobs[i]
        top: list[TokenLogprob] = []
        if row.params.logprobs > 0:
            values, ids = lp.topk(row.params.logprobs)
            top = [TokenLogprob(int(t), float(v)) for t, v in zip(ids, values)]
        results.append(SampledToken(token, float(lp[token]), top))
    return results
