"""TS-PEFT: the gate's arithmetic and gradients against a pure-torch reference, the threshold tracker,
a token-selective job inside the engine, and the served adapter computing what the training forward
computed (same gate, same log-probabilities)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load

from coserve.adapters.peft_format import build_adapter, parse_config, parse_tensors
from coserve.adapters.types import module_path
from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.engine.training.coforward import IGNORE, PassState, TrainRows, coserved_forward
from coserve.engine.training.module_selection import module_costs, probe_adapter, select_modules
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
        skipped = float((ratios < gate.threshold(ratios)).float().mean())
        gate.observe(ratios)
        gate.step()
    assert skipped == pytest.approx(0.3, abs=0.05)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-threshold", "threshold-per-module"])
def test_a_token_selective_job_skips_its_share_and_serves_what_it_trained(demo_tiny, shared):
    engine = LLMEngine(EngineConfig(model=str(demo_tiny), dtype="float32", kv_cache_memory=1 << 24))
    adapter = AdapterSpec("LORA", r=8, target_sparsity=0.5, target_modules=("q_proj", "v_proj", "down_proj"),
                          shared_threshold=shared)
    events = _train(engine, _spec(engine, adapter=adapter, n_epochs=6))
    metrics = [e.data for e in events if e.kind == "metrics" and "train_loss" in e.data]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    late = metrics[len(metrics) // 2 :]
    assert sum(m["token_sparsity"] for m in late) / len(late) == pytest.approx(0.5, abs=0.1)
    assert set(metrics[-1]["token_sparsity_per_module"]) == {"q_proj", "v_proj", "down_proj"}
    per_module = {name: sum(m["token_sparsity_per_module"][name] for m in late) / len(late)
                  for name in ("q_proj", "v_proj", "down_proj")}
    if not shared:  # every module holds the target itself (within its tracker's lag behind norms growing fast in a
        # short job; a shared bar left these three at 0.66 / 0.54 / 0.24)
        assert all(share == pytest.approx(0.5, abs=0.2) for share in per_module.values()), per_module
    else:  # one bar for all: the modules clear it unequally (per module the spread here was 0.16)
        assert max(per_module.values()) - min(per_module.values()) > 0.25, per_module

    config_raw, weights = next(e for e in events if e.kind == "succeeded").files
    config = json.loads(config_raw)
    thresholds = config["coserve_token_selection"]["thresholds"]
    assert len(thresholds) == 3 * engine.model.config.num_hidden_layers and all(t > 0 for t in thresholds.values())
    assert config["coserve_token_selection"]["threshold"] == ("shared" if shared else "per_module")
    assert (len(set(thresholds.values())) == 1) == shared  # a shared gate's one tau, stored for every module

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


@pytest.mark.parametrize("adapter", [AdapterSpec("LORA", r=4), AdapterSpec("LORA", r=4, use_dora=True),
                                     AdapterSpec("ROAD", variant="road_2", group_size=8), AdapterSpec("SHIRA", r=2)])
def test_module_costs_are_the_trained_parameters(demo_tiny, adapter):
    engine = LLMEngine(EngineConfig(model=str(demo_tiny), dtype="float32", kv_cache_memory=1 << 22))
    shape = engine.adapters.shape
    trained = TrainableAdapter(adapter, shape, lambda layer, module: torch.randn(*shape.module_shapes[module]), 0)
    assert trained.parameter_counts() == module_costs(adapter, shape)


def test_the_auto_probe_ranks_modules_and_the_job_trains_the_densest_within_budget(demo_tiny):
    engine = LLMEngine(EngineConfig(model=str(demo_tiny), dtype="float32", kv_cache_memory=1 << 24))
    job_adapter = AdapterSpec("LORA", r=4)
    probe = _spec(engine, adapter=probe_adapter(job_adapter), max_steps=10, n_epochs=50, checkpoint_every=100)
    events = _train(engine, probe)
    metrics = [e.data for e in events if e.kind == "metrics"]
    assert len(metrics) == 10 and not any(e.kind == "checkpoint" for e in events)
    late = [m["token_sparsity"] for m in metrics[5:]]
    assert 0.25 < sum(late) / len(late) < 0.75  # one shared bar (it lags the fast-growing norms of a short probe)
    density = next(e for e in events if e.kind == "succeeded").data["token_density"]
    costs = module_costs(job_adapter, engine.adapters.shape)
    assert set(density) == set(costs)
    assert max(density.values()) - min(density.values()) > 0.3  # modules clear the common bar unequally
    assert sum(density.values()) / len(density) == pytest.approx(1 - sum(late) / len(late), abs=0.1)

    budget = sum(costs.values()) // 2
    selection = select_modules(density, costs, budget, probe_steps=10)
    by_path = {m.module: m for m in selection.ranking}
    key_of = {module_path(int(k.split(":")[0]), k.split(":")[1]): k for k in costs}
    assert [m.token_density for m in selection.ranking] == sorted((m.token_density for m in selection.ranking),
                                                                  reverse=True)
    chosen = [key_of[m.module] for m in selection.ranking if m.selected]
    assert sum(costs[k] for k in chosen) == selection.selected_parameters <= budget
    for m in selection.ranking:  # greedy: a module left out did not fit beside the denser ones chosen
        if not m.selected:
            denser = sum(x.parameters for x in selection.ranking if x.selected and x.token_density >= m.token_density)
            assert denser + m.parameters > budget
    assert by_path[selection.ranking[0].module].selected

    # the job proper trains exactly the selected modules and exports them as PEFT module paths
    adapter = replace(job_adapter, target_parts=selection.parts())
    done = next(e for e in _train(engine, _spec(engine, adapter=adapter, job_id="main")) if e.kind == "succeeded")
    config = json.loads(done.files[0])
    assert sorted(config["target_modules"]) == sorted(m.module for m in selection.ranking if m.selected)
    trained = {name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for name in load(done.files[1])}
    assert trained == set(config["target_modules"])
