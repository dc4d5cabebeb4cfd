"""LoRA and DoRA (PEFT peft_type LORA): y = W0 x + s B A x; with use_dora, y = g * (W0 x + s B A x)
where g = m / ||W0 + s B A||_row is fixed per adapter (computed against the served base weight)."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from coserve.adapters.types import AdapterError, ModuleDelta, check_tensor, take_tensors

CONFIG_KEYS = {
    "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
    "lora_bias", "trainable_token_indices", "layer_replication", "use_qalora", "qalora_group_size",
    "alora_invocation_tokens", "target_parameters", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "kasa_config", "velora_config", "monteclora_config",
    "arrow_config", "ensure_weight_tying", "use_bdlora",
}
# Options that change what the forward computes in ways a mixed batch cannot serve.
_REFUSED = {
    "lora_bias": "lora_bias (a trained bias on lora_B)",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA",
    "target_parameters": "LoRA on raw parameters",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
}


def method_name(config: dict[str, Any]) -> str:
    return "DORA" if config.get("use_dora") else "LORA"


def check_config(config: dict[str, Any]) -> None:
    for key, what in _REFUSED.items():
        if config.get(key):
            raise AdapterError(f"{what} is not supported", key)
    if config.get("bias", "none") != "none":
        raise AdapterError("bias must be 'none': trained base biases cannot be served per request", "bias")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise AdapterError(f"r must be a positive integer, got {r!r}", "r")
    if not isinstance(config.get("lora_alpha", 8), (int, float)):
        raise AdapterError("lora_alpha must be a number", "lora_alpha")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterError(f"{key} must be an object", key)


def pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module name's tail as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def parse_module(
    config: dict[str, Any], parts: dict[str, torch.Tensor], prefix: str, module: str, out_f: int, in_f: int,
    max_rank: int,
) -> ModuleDelta:
    got = take_tensors(parts, prefix, "LoRA", ("lora_A.weight", "lora_B.weight"),
                       ("lora_magnitude_vector", "lora_magnitude_vector.weight"))
    a, b = got["lora_A.weight"], got["lora_B.weight"]
    magnitude = got.get("lora_magnitude_vector", got.get("lora_magnitude_vector.weight"))
    for suffix, t in (("lora_A.weight", a), ("lora_B.weight", b)):
        check_tensor(f"{prefix}.{suffix}", t)
    rank = a.shape[0]
    if a.dim() != 2 or a.shape[1] != in_f:
        raise AdapterError(f"tensor {prefix}.lora_A.weight has shape {tuple(a.shape)}; expected [r, {in_f}]",
                           f"{prefix}.lora_A.weight")
    if b.dim() != 2 or b.shape != (out_f, rank):
        raise AdapterError(f"tensor {prefix}.lora_B.weight has shape {tuple(b.shape)}; expected [{out_f}, {rank}]",
                           f"{prefix}.lora_B.weight")
    if not 1 <= rank <= max_rank:
        raise AdapterError(f"{prefix} has rank {rank}; the server's max_lora_rank is {max_rank}", "r")
    module_path = prefix.removeprefix("base_model.model.")
    expected_rank = pattern_value(config.get("rank_pattern") or {}, module_path, config["r"])
    if expected_rank != rank:
        raise AdapterError(f"{prefix} has rank {rank} but the config says {expected_rank}", "rank_pattern")
    alpha = pattern_value(config.get("alpha_pattern") or {}, module_path, config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    if config.get("use_dora"):
        if magnitude is None:
            raise AdapterError(f"tensor {prefix}.lora_magnitude_vector is missing (use_dora)",
                               f"{prefix}.lora_magnitude_vector")
        check_tensor(f"{prefix}.lora_magnitude_vector", magnitude)
        if magnitude.shape != (out_f,):
            raise AdapterError(f"tensor {prefix}.lora_magnitude_vector has shape {tuple(magnitude.shape)}; "
                               f"expected [{out_f}]", f"{prefix}.lora_magnitude_vector")
    elif magnitude is not None:
        raise AdapterError(f"tensor {prefix}.lora_magnitude_vector needs use_dora", "use_dora")
    return ModuleDelta(lora_a=a.float(), lora_b=b.float(), lora_scale=float(scale),
                       dora_magnitude=None if magnitude is None else magnitude.float())


def dora_gain(delta: ModuleDelta, base_weight: torch.Tensor) -> torch.Tensor:
    """g = m / ||W0 + s B A||_row, [out] float32, from the served (dequantized) base weight [out, in]."""
    combined = base_weight.float() + delta.lora_scale * (delta.lora_b @ delta.lora_a)
    return delta.dora_magnitude / combined.norm(dim=1)
