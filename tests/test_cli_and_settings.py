"""Settings precedence (flags > env > YAML > defaults), the CLI, and the demo checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from coserve.engine.demo import SIZES, random_llama_weights
from coserve.engine.loader import load_model
from coserve.settings import ServeSettings, parse_size


def test_settings_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "coserve.yaml"
    cfg.write_text("port: 9001\nmax_num_seqs: 8\nkv_cache_memory: 1GiB\nquantize: int8\n")
    monkeypatch.setenv("COSERVE_MAX_NUM_SEQS", "12")
    s = ServeSettings.load(cfg, port=None, quantize="int4")
    assert s.port == 9001  # from YAML
    assert s.max_num_seqs == 12  # env beats YAML
    assert s.quantize == "int4"  # flag beats both
    assert s.kv_cache_memory == 2**30
    assert ServeSettings.load(None).host == "127.0.0.1"
    monkeypatch.setenv("COSERVE_PREPACK_WEIGHTS", "false")
    assert ServeSettings.load(cfg).engine_config("m").prepack_weights is False
    assert ServeSettings.load(None, prepack_weights=True).engine_config("m").prepack_weights is True


def test_settings_reject_bad_values(tmp_path):
    with pytest.raises(ValidationError, match="quantize"):
        ServeSettings.load(None, quantize="int3")
    with pytest.raises(ValidationError, match="kv_cache_memory"):
        ServeSettings.load(None, kv_cache_memory="lots")
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_setting: 1\n")
    with pytest.raises(ValidationError, match="no_such_setting"):
        ServeSettings.load(bad)
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("2GB") == 2 * 10**9


def test_cli_help_documents_every_setting():
    out = subprocess.run([sys.executable, "-m", "coserve.cli", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in ServeSettings.model_fields:
        assert "--" + name.replace("_", "-") in out, name
    bad = subprocess.run([sys.executable, "-m", "coserve.cli", "serve", "--quantize", "int3"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "quantize" in bad.stderr


def test_demo_model_cli_writes_a_checkpoint_transformers_loads(tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "coserve.cli", "demo-model", "--size", "tiny", "--out", str(out)],
                   check=True, capture_output=True)
    config = json.loads((out / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")
    ids = tok("print('hello world')").input_ids
    ours = load_model(out, torch.float32)
    assert hf.config.vocab_size == ours.config.vocab_size == config["vocab_size"] <= SIZES["tiny"][0]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    assert torch.equal(hf.model.embed_tokens.weight, ours.model.embed_tokens.weight)
    assert len(ids) > 3


def test_small_demo_has_smollm_shape():
    vocab, hidden, layers, heads, kv, inter, _ = SIZES["small"]
    assert (vocab, hidden, layers, heads, kv, inter) == (49152, 576, 30, 9, 3, 1536)
    cfg = {"vocab_size": 32, "hidden_size": 18, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 9, "num_key_value_heads": 3}
    w = random_llama_weights(cfg, seed=0)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (6, 18)
    assert torch.equal(w["model.embed_tokens.weight"], random_llama_weights(cfg, seed=0)["model.embed_tokens.weight"])
