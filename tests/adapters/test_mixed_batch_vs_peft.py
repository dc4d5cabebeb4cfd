"""Every method served together in one batch, each request its own adapter (some the base model):
per request, greedy tokens equal transformers + peft with that adapter alone, logprobs within tolerance."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.scheduler.request import SamplingParams

NEW_TOKENS = 24


def peft_reference(base_dir, adapter_dir, prompt: list[int]) -> tuple[list[int], list[float]]:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval() if adapter_dir else base
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


def serve_mixed(base_dir, adapters: dict, prompts: dict, quantize="none"):
    engine = LLMEngine(EngineConfig(model=str(base_dir), dtype="float32", block_size=4, max_batch_tokens=40,
                                    kv_cache_memory=1 << 23, max_loras=len(adapters), quantize=quantize,
                                    int4_group_size=64))
    for name, path in adapters.items():
        engine.adapters.register_dir(name, path)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    results = {}
    for rid, (adapter, prompt) in prompts.items():
        engine.add_request(rid, prompt, params, adapter)
        results[rid] = ([], [])
    while engine.has_work:
        for out in engine.step():
            for d in out.deltas:
                results[out.request_id][0].extend(d.token_ids)
                results[out.request_id][1].extend(t.logprob for t in d.logprobs)
    return results


def _prompts(adapter_names, seed=0):
    gen = torch.Generator().manual_seed(seed)
    names = list(adapter_names) + [None, None]  # two requests on the base model
    return {f"r{i}-{n}": (n, torch.randint(0, 2048, (5 + 7 * i,), generator=gen).tolist())
            for i, n in enumerate(names)}


@pytest.mark.parametrize("model_fixture,adapters_fixture", [("hf_llama", "llama_adapters"),
                                                            ("hf_qwen2", "qwen2_adapters")])
def test_mixed_batch_matches_peft_per_request(model_fixture, adapters_fixture, request):
    base_dir, adapters = request.getfixturevalue(model_fixture), request.getfixturevalue(adapters_fixture)
    prompts = _prompts(adapters)
    got = serve_mixed(base_dir, adapters, prompts)
    for rid, (adapter, prompt) in prompts.items():
        ref_tokens, ref_logprobs = peft_reference(base_dir, adapters.get(adapter), prompt)
        tokens, logprobs = got[rid]
        assert tokens == ref_tokens, rid
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) <= 1e-3, rid


def test_adapters_change_the_output(hf_llama, llama_adapters):
    """Guard against a vacuous pass: each adapter's greedy output differs from the base model's."""
    prompt = list(range(40, 60))
    base_tokens, _ = peft_reference(hf_llama, None, prompt)
    for kind, path in llama_adapters.items():
        assert peft_reference(hf_llama, path, prompt)[0] != base_tokens, kind


@pytest.mark.parametrize("quantize,max_rel", [("int8", 0.05), ("int4", 0.6)])
def test_quantized_base_with_adapters_is_bounded(hf_llama, llama_adapters, quantize, max_rel):
    prompts = _prompts(llama_adapters, seed=3)
    exact = serve_mixed(hf_llama, llama_adapters, prompts)
    quant = serve_mixed(hf_llama, llama_adapters, prompts, quantize=quantize)
    for rid in prompts:
        first_exact, first_quant = exact[rid][1][0], quant[rid][1][0]
        assert abs(first_quant - first_exact) <= max_rel * max(1.0, abs(first_exact)), rid


def _scored(model, sequence: list[int], start: int) -> list[float]:
    """log p(sequence[i] | sequence[:i]) for i >= start, teacher forced."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([sequence])).logits[0].float(), -1)
    return [float(logprobs[i - 1, sequence[i]]) for i in range(start, len(sequence))]


def test_bfloat16_serving_tracks_peft_in_bfloat16(hf_llama, llama_adapters):
    """A bfloat16 engine keeps its LoRA/DoRA slot buffers in bfloat16 and multiplies in bfloat16 where
    segments are long (prefill): the served log-probs stay within bfloat16 noise of transformers + peft
    in bfloat16, several times closer than the same tokens scored without the adapter."""
    kinds = ("lora-all", "lora-patterns", "dora")
    engine = LLMEngine(EngineConfig(model=str(hf_llama), dtype="bfloat16", block_size=4, max_batch_tokens=64,
                                    kv_cache_memory=1 << 23, max_loras=len(kinds)))
    for kind in kinds:
        engine.adapters.register_dir(kind, llama_adapters[kind])
    gen = torch.Generator().manual_seed(7)
    prompts = {kind: torch.randint(0, 2048, (12 + 3 * i,), generator=gen).tolist() for i, kind in enumerate(kinds)}
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    served = {kind: ([], []) for kind in kinds}
    for kind, prompt in prompts.items():
        engine.add_request(kind, prompt, params, kind)
    while engine.has_work:
        for out in engine.step():
            for d in out.deltas:
                served[out.request_id][0].extend(d.token_ids)
                served[out.request_id][1].extend(t.logprob for t in d.logprobs)
    base = AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.bfloat16).eval()
    for kind, prompt in prompts.items():
        tokens, logprobs = served[kind]
        sequence = prompt + tokens
        with_adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.bfloat16), llama_adapters[kind]).eval()
        reference = _scored(with_adapter, sequence, len(prompt))
        without = _scored(base, sequence, len(prompt))
        error = max(abs(a - b) for a, b in zip(logprobs, reference))
        adapter_effect = max(abs(a - b) for a, b in zip(reference, without))
        assert error <= 0.1 and error * 5 <= adapter_effect, (kind, error, adapter_effect)
