"""Pre-packed 16-bit linears: the same outputs and input gradients as F.linear, applied only where they
belong, and an engine that serves and trains identically with packing on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.engine.loader import load_model
from coserve.engine.packed_linear import PackedLinear, pack_linears, packing_available
from coserve.engine.quantize import Int4Linear, quantize_model
from coserve.engine.training.params import AdapterSpec
from coserve.scheduler.request import SamplingParams
from tests.conftest import run_engine
from tests.engine.test_cotraining import _spec, _train

pytestmark = pytest.mark.skipif(not packing_available(), reason="oneDNN linear packing is not in this PyTorch build")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_and_its_input_gradient(dtype, bias):
    if not packing_available(dtype):
        pytest.skip(f"this CPU has no oneDNN packing for {dtype}")
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias).to(dtype).requires_grad_(False)
    packed = PackedLinear(linear)
    wide = torch.randn(7, 192, dtype=dtype)
    inputs = [torch.randn(5, 96, dtype=dtype), wide[:, :96], torch.randn(2, 3, 96, dtype=dtype),
              torch.randn(0, 96, dtype=dtype), torch.randn(1, 96, dtype=dtype)]
    for x in inputs:
        assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias)), x.shape
    assert torch.equal(packed.plain_weight(), linear.weight)
    assert torch.equal(packed.dequantized_weight(), linear.weight.float())

    x = torch.randn(6, 96, dtype=dtype, requires_grad=True)
    dy = torch.randn(6, 160, dtype=dtype)
    (packed(x) * dy).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, linear.weight, linear.bias) * dy).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_pack_linears_takes_the_16_bit_linears_left_after_quantization(hf_llama):
    model = load_model(hf_llama, torch.float32)
    assert pack_linears(model) == 0  # float32 stays on MKL's sgemm

    model = load_model(hf_llama, torch.bfloat16)
    layers = len(model.model.layers)
    assert pack_linears(model) == 4 * layers + 1
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(model.lm_head, PackedLinear)

    model = load_model(hf_llama, torch.bfloat16)
    quantize_model(model, "int4", group_size=64)
    assert pack_linears(model) == 1  # the lm_head only
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    assert isinstance(model.lm_head, PackedLinear)


def test_a_tied_lm_head_unpacks_to_the_embedding_itself(demo_tiny):
    model = load_model(demo_tiny, torch.bfloat16)
    assert model.config.tie_word_embeddings
    pack_linears(model)
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.plain_weight().data_ptr() == embedding.data_ptr()  # no unpacked copy
    hidden = torch.randn(3, embedding.shape[1], dtype=torch.bfloat16)
    assert torch.equal(model.logits(hidden, upcast=False), F.linear(hidden, embedding))


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_engine_serves_the_same_tokens_and_logprobs_with_packing_on_and_off(hf_llama, quantize):
    prompts = {f"p{i}": torch.randint(0, 2048, (5 + 7 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(4)}
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    runs, logprobs = {}, {}
    for prepack in (True, False):
        engine = LLMEngine(EngineConfig(model=str(hf_llama), dtype="bfloat16", quantize=quantize, int4_group_size=64,
                                        prepack_weights=prepack, kv_cache_memory=1 << 22))
        assert (engine.num_packed_linears > 0) == prepack
        seen = []
        runs[prepack] = run_engine(engine, {rid: (p, params) for rid, p in prompts.items()})
        for rid, p in prompts.items():  # one more request, read delta by delta for its log-probs
            engine.add_request(rid + "-lp", p, params)
        while engine.has_work:
            for out in engine.step():
                seen += [(out.request_id, s.token_id, s.logprob,
                          [(t.token_id, t.logprob) for t in s.top_logprobs or []])
                         for d in out.deltas for s in d.logprobs]
        logprobs[prepack] = sorted(seen)
    assert runs[True] == runs[False]
    assert logprobs[True] == logprobs[False]


def test_training_on_a_packed_bfloat16_base_equals_the_unpacked_one(demo_tiny):
    finals = {}
    for prepack in (True, False):
        engine = LLMEngine(EngineConfig(model=str(demo_tiny), dtype="bfloat16", prepack_weights=prepack,
                                        kv_cache_memory=1 << 24))
        events = _train(engine, _spec(engine, adapter=AdapterSpec("LORA", r=8), n_epochs=1))
        losses = [e.data["train_loss"] for e in events if e.kind == "metrics" and "train_loss" in e.data]
        finals[prepack] = losses
    assert len(finals[True]) >= 3
    assert finals[True] == finals[False]


def test_a_backward_call_unpacks_each_frozen_weight_once(monkeypatch):
    """Several training chunks through one packed linear: one backward call unpacks its weight once (not
    once per chunk), and the input gradients are still dy W0 per chunk."""
    from coserve.engine.training import coforward

    torch.manual_seed(0)
    linear = nn.Linear(32, 48, bias=False).to(torch.bfloat16).requires_grad_(False)
    packed = PackedLinear(linear)
    unpacks = []
    plain_weight = PackedLinear.plain_weight
    monkeypatch.setattr(PackedLinear, "plain_weight", lambda self, dtype=None: unpacks.append(1) or
                        plain_weight(self, dtype))
    chunks = [torch.randn(n, 32, dtype=torch.bfloat16, requires_grad=True) for n in (3, 5, 2)]
    outs = [coforward.FrozenBaseGrad.apply(x, packed(x.detach()), packed) for x in chunks]
    grads = [torch.randn_like(o) for o in outs]
    with coforward._frozen_weights_made_once():
        torch.autograd.backward(outs, grads)
    assert len(unpacks) == 1
    for x, dy in zip(chunks, grads):
        assert torch.equal(x.grad, dy @ linear.weight)
    coforward.compute_weight(packed, torch.bfloat16)  # outside a backward call nothing is kept
    assert len(unpacks) == 2
