"""PEFT adapters made on the fly for the tiny checkpoints (non-zero weights, so they matter)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, RoadConfig, ShiraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ADAPTER_CONFIGS = {
    "lora-all": lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    "lora-patterns": lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
        rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 3}, layers_to_transform=[1],
        init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True,
                               init_lora_weights=False),
    "road": lambda: RoadConfig(variant="road_2", group_size=16, target_modules=["o_proj", "gate_proj", "k_proj"],
                               init_weights=False),
    "road1": lambda: RoadConfig(variant="road_1", group_size=8, target_modules=["down_proj"], init_weights=False),
    "road4": lambda: RoadConfig(variant="road_4", group_size=32, target_modules=["q_proj"], init_weights=False),
    "shira": lambda: ShiraConfig(r=2, target_modules=["down_proj", "q_proj"], init_weights=False),
}


def make_adapter(base_dir: Path, kind: str, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, ADAPTER_CONFIGS[kind]())
    with torch.no_grad():  # make every adapter tensor clearly non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name or "shira_weight" in name:
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_adapters(hf_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama-adapters")
    return {kind: make_adapter(hf_llama, kind, root / kind, seed=i) for i, kind in enumerate(ADAPTER_CONFIGS)}


@pytest.fixture(scope="session")
def qwen2_adapters(hf_qwen2, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen2-adapters")
    return {kind: make_adapter(hf_qwen2, kind, root / kind, seed=10 + i)
            for i, kind in enumerate(("lora-all", "dora", "road", "shira"))}
