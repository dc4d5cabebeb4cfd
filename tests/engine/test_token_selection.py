"""TS-PEFT: the gate's arithmetic and gradients against a pure-torch reference, the threshold tracker,
a token-selective job inside the engine, and the served adapter computing what the training forward
computed (same gate, same log-probabilities)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load

from coserve.adapters.peft_format import build_adapter, parse_config, parse_tensors
from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.engine.training.coforward import IGNORE, PassState, TrainRows, coserved_forward
from coserve.engine.training.params import AdapterSpec, TrainableAdapter
from coserve.engine.training.token_gate import TokenGate, gate_ref, lora_gated
from coserve.kernels.adapter_ops import gate_updates, update_ratio
from coserve.scheduler.request import SamplingParams
from tests.engine.test_cotraining import _samples, _spec, _train


def test_lora_gate_matches_the_reference_with_gradients():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 16, generator=gen), torch.randn(40, 24, generator=gen)
    a = torch.randn(4, 16, generator=gen).requires_grad_()
    b = torch.randn(24, 4, generator=gen).requires_grad_()
    weights = torch.randn(40, 24, generator=gen)
    tau = float(torch.quantile(update_ratio(2.0 * (x @ a.T) @ b.T, y), 0.5))

    out, kept, _ = lora_gated(x, y, a, b, 2.0, lambda ratios: tau)
    (out * weights).sum().backward()
    grads = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    reference = gate_ref(y, 2.0 * (x @ a.T) @ b.T, tau)
    (reference * weights).sum().backward()

    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grads[0], a.grad)
    torch.testing.assert_close(grads[1], b.grad)
    assert 15 <= int(kept.sum()) <= 25  # about half the tokens kept
    skipped = ~kept
    torch.testing.assert_close(out[skipped], y[skipped])  # gated-out rows are the base output exactly
    served = gate_updates(y, y + 2.0 * (x @ a.T) @ b.T, torch.full((40,), tau))  # the serving kernel
    torch.testing.assert_close(served, reference.detach())


def test_thresholds_track_the_target_sparsity():
    gate = TokenGate(0.3)
    gen = torch.Generator().manual_seed(1)
    for step in range(60):  # update ratios drift upward as training goes, the share skipped stays on target
        ratios = torch.rand(512, generator=gen) * (1 + step / 20)
        gate.count(ratios >= gate.threshold(ratios), ratios)
        skipped = gate.step()
    assert skipped == pytest.approx(0.3, abs=0.05)


def test_a_token_selective_job_skips_its_share_and_serves_what_it_trained(demo_tiny):
    engine = LLMEngine(EngineConfig(model=str(demo_tiny), dtype="float32", kv_cache_memory=1 << 24))
    adapter = AdapterSpec("LORA", r=8, target_sparsity=0.5, target_modules=("q_proj", "v_proj", "down_proj"))
    events = _train(engine, _spec(engine, adapter=adapter, n_epochs=6))
    metrics = [e.data for e in events if e.kind == "metrics" and "train_loss" in e.data]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    late = [m["token_sparsity"] for m in metrics[len(metrics) // 2 :]]
    assert sum(late) / len(late) == pytest.approx(0.5, abs=0.1)
    assert set(metrics[-1]["token_sparsity_per_module"]) == {"q_proj", "v_proj", "down_proj"}

    config_raw, weights = next(e for e in events if e.kind == "succeeded").files
    config = json.loads(config_raw)
    thresholds = config["coserve_token_selection"]["thresholds"]
    assert len(thresholds) == 3 * engine.model.config.num_hidden_layers and all(t > 0 for t in thresholds.values())

    # the training forward's log-likelihood of a continuation equals the served log-probs of it
    served = build_adapter("ts", parse_config(config_raw), parse_tensors(weights), engine.adapters.shape, 16)
    assert all(d.gate_tau is not None for d in served.modules.values())
    engine.register_adapter("ts", lambda: served, served)
    prompt = _samples(engine)[0].token_ids[:9]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    engine.add_request("r", prompt, params, "ts")
    tokens, logprobs = [], []
    while engine.has_work:
        for out in engine.step():
            for d in out.deltas:
                tokens += d.token_ids
                logprobs += [lp.logprob for lp in d.logprobs]
    trained = TrainableAdapter(adapter, engine.adapters.shape, None, seed=0)
    trained.load_peft_tensors(load(weights))
    trained.set_thresholds(thresholds)
    sequence = prompt + tokens
    labels = [IGNORE] * (len(prompt) - 1) + tokens + [IGNORE]
    state = PassState(engine.model.config.num_hidden_layers, 1.0, grad=False)
    coserved_forward(engine.model, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), None,
                     engine.runner.kv_caches, [TrainRows(0, sequence, 0, labels)], state, trained)
    assert state.num_label_tokens == len(tokens)
    assert -state.loss_sum == pytest.approx(sum(logprobs), abs=1e-3)
