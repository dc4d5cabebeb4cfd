"""Every malformed or unsafe adapter is refused with an AdapterError naming the field or tensor."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from coserve.adapters.peft_format import load_adapter_dir
from coserve.adapters.types import AdapterError, BaseModelShape

BASE = BaseModelShape(2, {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
                          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)})
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def lora_dir(llama_adapters, tmp_path):
    target = tmp_path / "lora"
    shutil.copytree(llama_adapters["lora-all"], target)
    return target


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    tensors = load_file(path / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def refused(path, field: str, max_rank: int = 16) -> AdapterError:
    with pytest.raises(AdapterError) as exc:
        load_adapter_dir("x", path, BASE, max_rank)
    assert exc.value.field == field, str(exc.value)
    assert str(exc.value)
    return exc.value


def test_good_adapter_loads(lora_dir):
    adapter = load_adapter_dir("ok", lora_dir, BASE, 16)
    assert adapter.method == "LORA" and adapter.rank == 8 and len(adapter.modules) == 14


@pytest.mark.parametrize("change,field", [
    ({"peft_type": "PROMPT_TUNING"}, "peft_type"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"lora_bias": True}, "lora_bias"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"bias": "all"}, "bias"),
    ({"surprise_option": 1}, "surprise_option"),
    ({"auto_mapping": {"base_model_class": "Evil", "parent_library": "evil_pkg.models"}}, "auto_mapping"),
    ({"r": 0}, "r"),
])
def test_config_refusals(lora_dir, change, field):
    edit_config(lora_dir, **change)
    refused(lora_dir, field)


def test_rank_above_the_cap(lora_dir):
    refused(lora_dir, "r", max_rank=4)


def test_pickles_are_never_loaded(lora_dir):
    (lora_dir / "adapter_model.safetensors").unlink()
    (lora_dir / "adapter_model.bin").write_bytes(pickle.dumps({"a": 1}))
    assert "pickle" in str(refused(lora_dir, "adapter_model.safetensors"))
    (lora_dir / "adapter_model.safetensors").write_bytes(pickle.dumps({"a": 1}))  # renamed pickle
    assert "pickle" in str(refused(lora_dir, "adapter_model.safetensors"))


@pytest.mark.parametrize("mangle", ["truncate", "huge_header", "garbage_header"])
def test_malformed_safetensors(lora_dir, mangle):
    path = lora_dir / "adapter_model.safetensors"
    raw = path.read_bytes()
    if mangle == "truncate":
        raw = raw[: len(raw) // 2]
    elif mangle == "huge_header":
        raw = (2**40).to_bytes(8, "little") + raw[8:]
    else:
        raw = raw[:8] + b"\xff" * (len(raw) - 8)
    path.write_bytes(raw)
    refused(lora_dir, "adapter_model.safetensors")


@pytest.mark.parametrize("mangle,field", [
    (lambda t: t.__setitem__(Q_A, torch.zeros(8, 65)), Q_A),
    (lambda t: t.__setitem__(Q_A, torch.zeros(8, 64, dtype=torch.int32)), Q_A),
    (lambda t: t.__setitem__(Q_A, torch.full((8, 64), float("nan"))), Q_A),
    (lambda t: t.__setitem__("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", torch.zeros(8, 64)),
     "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"),
    (lambda t: t.__setitem__("base_model.model.lm_head.lora_A.weight", torch.zeros(8, 64)),
     "base_model.model.lm_head.lora_A.weight"),
    (lambda t: t.pop(Q_A.replace("lora_A", "lora_B")), Q_A.replace("lora_A", "lora_B")),
])
def test_tensor_refusals(lora_dir, mangle, field):
    edit_tensors(lora_dir, mangle)
    refused(lora_dir, field)


def test_road_and_shira_refusals(llama_adapters, tmp_path):
    road = tmp_path / "road"
    shutil.copytree(llama_adapters["road"], road)
    edit_config(road, group_size=48)
    refused(road, "group_size")
    edit_config(road, group_size=16, variant="road_9")
    refused(road, "variant")
    shira = tmp_path / "shira"
    shutil.copytree(llama_adapters["shira"], shira)
    key = "base_model.model.model.layers.0.mlp.down_proj.shira_indices"
    edit_tensors(shira, lambda t: t[key].__setitem__((0, 0), 10_000))
    refused(shira, key)
