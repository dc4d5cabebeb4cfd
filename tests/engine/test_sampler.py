"""Sampling against straightforward references."""

from __future__ import annotations

import torch

from coserve.engine.sampler import SampleRow, apply_penalties, greedy_choice, sample, top_k_top_p_filter
from coserve.scheduler.request import SamplingParams


def reference_filter(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """One row: keep the k best, then the smallest prefix whose mass reaches p."""
    order = logits.argsort(descending=True).tolist()
    if k > 0:
        order = order[:k]
    probs = torch.softmax(logits[order], -1)
    kept, mass = [], 0.0
    for idx, prob in zip(order, probs.tolist()):
        if mass >= p and kept:
            break
        kept.append(idx)
        mass += prob
    out = torch.full_like(logits, float("-inf"))
    out[kept] = logits[kept]
    return out


def test_top_k_top_p_filter_matches_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen) * 3
    ks = torch.tensor([0, 1, 5, 0, 10, 50])
    ps = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.3, 0.99])
    got = top_k_top_p_filter(logits, ks, ps)
    for i in range(6):
        ref = reference_filter(logits[i], int(ks[i]), float(ps[i]))
        assert torch.equal(torch.isinf(got[i]), torch.isinf(ref)), i
        finite = ~torch.isinf(ref)
        assert torch.allclose(got[i][finite], ref[finite])


def test_penalties_follow_openai_formula():
    logits = torch.zeros(1, 5)
    row = SampleRow(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1, 1, 3], None)
    out = apply_penalties(logits.clone(), [row])
    assert out[0].tolist() == [0.0, -(0.5 + 2 * 0.25), 0.0, -(0.5 + 0.25), 0.0]


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=5)

    def run():
        rows = [SampleRow(params, [], torch.Generator().manual_seed(5)) for _ in range(3)]
        return [t.token_id for t in sample(logits, rows, torch.Generator().manual_seed(0))]

    assert run() == run()
    greedy = [SampleRow(SamplingParams(temperature=0.0, logprobs=2), [], None) for _ in range(3)]
    tokens = sample(logits, greedy, torch.Generator())
    assert [t.token_id for t in tokens] == logits.argmax(-1).tolist()
    lp = logits.log_softmax(-1)
    for i, t in enumerate(tokens):
        assert abs(t.logprob - float(lp[i].max())) < 1e-6
        assert [a.token_id for a in t.top_logprobs] == lp[i].topk(2).indices.tolist()


def test_compute_dtype_logits_sample_as_their_float32_upcast():
    """The runner hands over bfloat16 logits: every kind of row must sample as from the exact upcast."""
    logits = (torch.randn(4, 300, generator=torch.Generator().manual_seed(2)) * 4).bfloat16()
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=3),
             SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5),
             SamplingParams(temperature=0.9, top_k=20, seed=3)]

    def run(values):
        rows = [SampleRow(p, [int(values[i].argmax())] * 2, torch.Generator().manual_seed(3))
                for i, p in enumerate(kinds)]
        return sample(values, rows, torch.Generator().manual_seed(0))

    assert run(logits) == run(logits.float())


def test_greedy_choice_is_the_first_maximum_in_every_dtype():
    """bf16/fp16 logits go through max() (faster on the CPU): ties and NaN must resolve as float32 argmax."""
    gen = torch.Generator().manual_seed(4)
    values = torch.randint(0, 4, (64, 49_152), generator=gen).float()  # many tied maxima per row
    values[3, 100] = float("nan")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(greedy_choice(values.to(dtype)), values.argmax(-1)), dtype


def test_sampling_distribution_follows_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0.5)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample(logits, [SampleRow(params, [], None)], gen)[0].token_id] += 1
    expected = torch.softmax(logits[0] / 0.5, -1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)
