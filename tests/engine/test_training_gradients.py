"""coserve's co-served training step against transformers + peft on the same batch: the fused
forward (inference rows + chunked training rows), the loss and every adapter gradient."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, RoadConfig, ShiraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from coserve.engine.adapter_runtime import base_shape
from coserve.engine.loader import load_model
from coserve.engine.runner import allocate_kv_cache, plan_kv_cache
from coserve.engine.training import coforward
from coserve.engine.training.coforward import IGNORE, PassState, TrainRows, backward_layers, coserved_forward
from coserve.engine.training.cotrain import CoTrainer
from coserve.engine.training.params import AdapterSpec, TrainableAdapter
from coserve.engine.training.trainer import TrainSample
from coserve.kernels.attention import AttentionMetadata
from coserve.scheduler.train_share import TrainShareConfig

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = {
    "lora": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL), init_lora_weights=False),
             AdapterSpec("LORA", r=4, lora_alpha=8)),
    "lora-some-parts": (  # packed linears with parts left out (k of qkv, gate of gate_up): zero slices
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
        AdapterSpec("LORA", r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj"))),
    "dora": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True,
                                init_lora_weights=False),
             AdapterSpec("LORA", r=4, lora_alpha=8, use_dora=True, target_modules=("q_proj", "o_proj", "up_proj"))),
    "road": (lambda: RoadConfig(variant="road_2", group_size=16, target_modules=["o_proj", "gate_proj", "k_proj"],
                                init_weights=False),
             AdapterSpec("ROAD", variant="road_2", group_size=16, target_modules=("o_proj", "gate_proj", "k_proj"))),
    "road1": (lambda: RoadConfig(variant="road_1", group_size=8, target_modules=["down_proj", "q_proj"],
                                 init_weights=False),
              AdapterSpec("ROAD", variant="road_1", group_size=8, target_modules=("down_proj", "q_proj"))),
    "shira": (lambda: ShiraConfig(r=2, target_modules=["down_proj", "v_proj"], init_weights=False),
              AdapterSpec("SHIRA", r=2, target_modules=("down_proj", "v_proj"))),
}
SAMPLES = [TrainSample(list(range(40, 51)), [False] * 4 + [True] * 7),
           TrainSample([7, 300, 9, 1200, 5, 77, 18], [False, False] + [True] * 5)]


def _peft_model(base_dir, kind: str, out):
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), CASES[kind][0]())
    with torch.no_grad():  # non-zero updates everywhere, so every gradient path matters
        for name, p in model.named_parameters():
            if "lora_B" in name or "shira_weight" in name:
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif "road_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out)
    return model


def _reference_grads(model) -> tuple[float, dict[str, torch.Tensor]]:
    total = sum(s.num_targets for s in SAMPLES)
    loss = 0.0
    for s in SAMPLES:
        ids = torch.tensor([s.token_ids])
        logits = model(input_ids=ids).logits[0, :-1].float()
        targets = torch.tensor([t if m else IGNORE for t, m in zip(s.token_ids[1:], s.loss_mask[1:])])
        loss = loss + torch.nn.functional.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)
    (loss / total).backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            name = name.replace(".default", "")
            grads[name.removesuffix(".weight") if "magnitude" in name else name] = p.grad
    return float(loss) / total, grads


@pytest.mark.parametrize("recompute", [False, True], ids=["graphs", "recompute"])
@pytest.mark.parametrize("kind", list(CASES))
def test_fused_training_step_matches_peft(hf_llama, tmp_path, kind, recompute, monkeypatch):
    """recompute: the chunks run without autograd and each layer is re-run over the whole pass at backward."""
    monkeypatch.setattr(coforward, "HEAD_ROWS", 3)  # the loss head in pieces of 3 labelled rows (and a remainder)
    reference = _peft_model(hf_llama, kind, tmp_path / kind)
    ref_loss, ref_grads = _reference_grads(reference)

    model = load_model(hf_llama, torch.float32)
    shape = base_shape(model)
    trainer = CoTrainer(model, shape, TrainShareConfig(None))
    adapter = TrainableAdapter(CASES[kind][1], shape, trainer.base_weight_of, seed=0)
    saved = load_file(tmp_path / kind / "adapter_model.safetensors")
    adapter.load_peft_tensors(saved)

    # inference rows share the forward: a 5-token prefill in the paged cache
    mc = model.config
    kv = allocate_kv_cache(mc, plan_kv_cache(mc, 2**20, 16, torch.float32), torch.float32)
    prompt = torch.tensor([11, 12, 13, 14, 15])
    meta = AttentionMetadata.build([5], [0], [[0]], 16)
    state = PassState(mc.num_hidden_layers, 1.0 / sum(s.num_targets for s in SAMPLES), recompute=recompute)
    labels = [s.labels() for s in SAMPLES]
    chunk1 = [TrainRows(0, SAMPLES[0].token_ids[:6], 0, labels[0][:6]),
              TrainRows(1, SAMPLES[1].token_ids, 0, labels[1])]
    chunk2 = [TrainRows(0, SAMPLES[0].token_ids[6:], 6, labels[0][6:])]
    hidden = coserved_forward(model, prompt, torch.arange(5), meta, kv, chunk1, state, adapter)
    coserved_forward(model, prompt[:0], torch.arange(0), None, kv, chunk2, state, adapter)
    while not state.backward_done:
        backward_layers(state, 1, model, adapter)  # one stage per step, as under load

    fresh = allocate_kv_cache(mc, plan_kv_cache(mc, 2**20, 16, torch.float32), torch.float32)
    with torch.inference_mode():
        alone = model(prompt, torch.arange(5), meta, fresh)
    torch.testing.assert_close(hidden, alone, atol=1e-5, rtol=1e-5)  # inference rows unaffected

    assert state.loss_sum / state.num_label_tokens == pytest.approx(ref_loss, rel=1e-5)
    ours = {name: t.grad for name, t in adapter.live_tensors().items() if t.requires_grad}
    assert set(ours) == set(ref_grads)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)
