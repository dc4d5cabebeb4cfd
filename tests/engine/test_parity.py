"""coserve's model against transformers on the same checkpoint (float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.engine.loader import load_model
from coserve.engine.runner import allocate_kv_cache, plan_kv_cache
from coserve.kernels.attention import AttentionMetadata
from coserve.scheduler.request import SamplingParams
from tests.conftest import make_hf_checkpoint, run_engine


@pytest.fixture(scope="module")
def hf_mistral(tmp_path_factory, demo_tiny):
    return make_hf_checkpoint("mistral", tmp_path_factory.mktemp("hf-mistral"), demo_tiny, sliding_window=None)


@pytest.mark.parametrize("checkpoint", ["hf_llama", "hf_qwen2", "hf_mistral"])
def test_prefill_logits_match_transformers(checkpoint, request):
    path = request.getfixturevalue(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path, torch.float32)
    block_size = 8
    kv = allocate_kv_cache(model.config, plan_kv_cache(model.config, 1 << 22, block_size, torch.float32), torch.float32)
    gen = torch.Generator().manual_seed(0)
    lengths = [37, 5, 20]
    prompts = [torch.randint(0, 2048, (n,), generator=gen) for n in lengths]
    # Three prompts in one flat batch, with scattered (non-contiguous) block tables.
    tables, next_block = [], 40
    for n in lengths:
        count = -(-n // block_size)
        tables.append(list(range(next_block, next_block - count, -1)))
        next_block -= count + 1
    meta = AttentionMetadata.build(lengths, [0, 0, 0], tables, block_size)
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.inference_mode():
        logits = model.logits(model(torch.cat(prompts), positions, meta, kv))
        start = 0
        for prompt in prompts:
            ref = hf(prompt[None]).logits[0]
            got = logits[start : start + len(prompt)]
            assert (got - ref).abs().max().item() <= 1e-4
            start += len(prompt)


@pytest.mark.parametrize("checkpoint", ["hf_llama", "hf_qwen2"])
def test_greedy_generation_matches_transformers_in_mixed_batches(checkpoint, request):
    path = request.getfixturevalue(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # A small token budget forces chunked prefill beside running decodes; small blocks span many blocks.
    engine = LLMEngine(
        EngineConfig(model=str(path), dtype="float32", block_size=4, max_batch_tokens=24, kv_cache_memory=1 << 22)
    )
    gen = torch.Generator().manual_seed(1)
    prompts = {f"r{n}": torch.randint(0, 2048, (n,), generator=gen).tolist() for n in (3, 17, 40, 9, 64)}
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    got = run_engine(engine, {rid: (p, params) for rid, p in prompts.items()})
    for rid, prompt in prompts.items():
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert got[rid][0] == ref, rid
