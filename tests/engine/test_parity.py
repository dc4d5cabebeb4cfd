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


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_preemption_and_recompute_keep_greedy_outputs_exact(hf_llama):
    """A KV pool too small for all requests at once forces preemption; outputs must not change."""
    hf = AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32).eval()
    from coserve.engine.runner import kv_bytes_per_block

    per_block = kv_bytes_per_block(load_model(hf_llama, torch.float32).config, 4, torch.float32)
    engine = LLMEngine(EngineConfig(model=str(hf_llama), dtype="float32", block_size=4, max_batch_tokens=64,
                                    kv_cache_memory=24 * per_block))  # 24 blocks = 96 token slots
    gen = torch.Generator().manual_seed(5)
    prompts = {f"p{i}": torch.randint(0, 2048, (12,), generator=gen).tolist() for i in range(4)}
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    got = run_engine(engine, {rid: (p, params) for rid, p in prompts.items()})
    assert engine.scheduler.num_preemptions > 0
    for rid, prompt in prompts.items():
        assert got[rid][0] == _hf_greedy(hf, prompt, 20), rid


def test_prefix_cache_hits_and_changes_nothing(hf_llama):
    hf = AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(model=str(hf_llama), dtype="float32", block_size=4, kv_cache_memory=1 << 22))
    shared = torch.randint(0, 2048, (30,), generator=torch.Generator().manual_seed(9)).tolist()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = run_engine(engine, {"a": (shared + [5, 6], params)})
    second = run_engine(engine, {"b": (shared + [7], params)})
    assert engine.blocks.prefix_hit_tokens >= 28  # seven full blocks of the shared prefix
    assert first["a"][0] == _hf_greedy(hf, shared + [5, 6], 8)
    assert second["b"][0] == _hf_greedy(hf, shared + [7], 8)


def test_sharded_checkpoint_loads_like_a_single_file(hf_llama, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    single, sharded = load_model(hf_llama, torch.float32), load_model(tmp_path, torch.float32)
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_loader_refuses_pickles_and_mismatched_tensors(hf_llama, tmp_path):
    import json
    import shutil

    (tmp_path / "config.json").write_text((hf_llama / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="safetensors only"):
        load_model(tmp_path, torch.float32)
    broken = tmp_path / "broken"
    shutil.copytree(hf_llama, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_model(broken, torch.float32)
