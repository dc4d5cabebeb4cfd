"""Hugging Face checkpoint directory -> CausalLM. Safetensors only, never pickle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from coserve.engine.model import PACKED_MODULES, CausalLM, ModelConfig, rope_inv_freq

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a Hugging Face checkpoint directory")
    return ModelConfig.from_hf(json.loads(path.read_text()))


def weight_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise ValueError(f"{model_dir} holds only pickle weights (.bin/.pt); coserve loads safetensors only")
    raise FileNotFoundError(f"{model_dir} has no model.safetensors nor model.safetensors.index.json")


FINGERPRINT_SAMPLE_BYTES = 1 << 20


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """Identifies the base weights (not the serving dtype or quantization): sha256 over config.json and,
    per weight file, its safetensors header plus the first MiB of tensor data. 16 hex digits."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for file in weight_files(model_dir):
        with file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(header_len))
            digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def _packed_target(key: str) -> tuple[str, int] | None:
    """'...self_attn.k_proj.weight' -> ('...self_attn.qkv_proj.weight', 1): fused name and part index."""
    parts = key.split(".")
    if len(parts) < 2:
        return None
    for fused, members in PACKED_MODULES.items():
        if parts[-2] in members:
            return ".".join(parts[:-2] + [fused, parts[-1]]), members.index(parts[-2])
    return None


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> CausalLM:
    """Build the model on the meta device, then assign tensors read from memory-mapped safetensors."""
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    with torch.device("meta"):
        model = CausalLM(config)
    expected = set(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[int, torch.Tensor]] = {}
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(_IGNORED_SUFFIXES):
                    continue
                target = _packed_target(key)
                if target is not None and target[0] in expected:
                    packed.setdefault(target[0], {})[target[1]] = f.get_tensor(key).to(dtype)
                elif key in expected:
                    state[key] = f.get_tensor(key).to(dtype)
                else:
                    raise ValueError(f"{file.name}: unexpected tensor {key!r} for a {config.model_type} model")
    for fused, parts in packed.items():
        count = len(PACKED_MODULES[fused.split(".")[-2]])
        if len(parts) != count:
            raise ValueError(f"checkpoint lacks part of {fused!r} ({len(parts)} of {count} projections)")
        state[fused] = torch.cat([parts[i] for i in range(count)], dim=0)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - state.keys())
    if missing:
        raise ValueError(f"checkpoint is missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, tensor in state.items():
        want = model.state_dict()[key].shape
        if tensor.shape != want:
            raise ValueError(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(want)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config)
    model.requires_grad_(False)
    return model.eval()
