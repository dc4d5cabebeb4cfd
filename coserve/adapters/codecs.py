"""Stored forms of an adapter's tensors: `none` (the uploaded safetensors as is) and `compeft`.

ComPEFT (REFERENCE.md section 5): per tensor tau, keep the top-`density` fraction of entries
by |tau|, store their signs and one scale, drop the rest. The scale is alpha * std(tau) with
alpha chosen by least squares (scale = mean |tau| over the kept entries), which minimises
||tau - scale * ternary||_2 for the chosen support. Stored per tensor: a bit mask of the
kept positions, the kept signs as bits, and the scale: about (1 + density) bits per entry
instead of 16 or 32, so a float32 LoRA at density 0.1 is about 29x smaller.

Only LoRA A/B matrices are compressed; DoRA magnitudes (per-channel norms that do not
survive sparsification) and every other tensor are kept as uploaded. SHiRA adapters are
sparse by construction: their PEFT form already is (indices, values) and is stored as is.
"""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from coserve.adapters.types import AdapterError

CODECS = ("none", "compeft")
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_DTYPES = {"torch.float32": torch.float32, "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16}
_META_KEY = "coserve.compeft"


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """bool [n] -> uint8 [ceil(n/8)], most significant bit first."""
    padded = torch.zeros(math.ceil(flags.numel() / 8) * 8, dtype=torch.uint8)
    padded[: flags.numel()] = flags.to(torch.uint8)
    return (padded.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [ceil(n/8)] -> bool [n]."""
    return ((packed.unsqueeze(1) & _BITS) != 0).view(-1)[:n]


def compress_tensor(tau: torch.Tensor, density: float) -> dict[str, torch.Tensor]:
    """tau (any shape) -> {"mask": uint8 bits, "sign": uint8 bits of the kept entries, "scale": float32 [1]}."""
    flat = tau.detach().float().reshape(-1)
    k = max(1, round(density * flat.numel()))
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[flat.abs().topk(k).indices] = True
    values = flat[kept]  # in position order
    scale = values.abs().mean()
    return {"mask": pack_bits(kept), "sign": pack_bits(values > 0), "scale": scale.reshape(1)}


def decompress_tensor(parts: dict[str, torch.Tensor], shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    n = math.prod(shape)
    kept = unpack_bits(parts["mask"], n)
    k = int(kept.sum())
    signs = unpack_bits(parts["sign"], k).float() * 2 - 1
    flat = torch.zeros(n)
    flat[kept] = signs * parts["scale"].float()
    return flat.view(shape).to(dtype)


def compressible(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def encode(codec: str, raw_weights: bytes, tensors: dict[str, torch.Tensor], density: float) -> bytes:
    """The bytes to store for already-validated weights (`raw_weights` is their uploaded safetensors)."""
    if codec == "none":
        return raw_weights
    if codec != "compeft":
        raise AdapterError(f"codec must be one of {CODECS}", "codec")
    if not 0 < density <= 1:
        raise AdapterError("compeft_density must lie in (0, 1]", "compeft_density")
    if not any(compressible(k) for k in tensors):
        raise AdapterError("compeft compresses LoRA/DoRA A and B matrices; this adapter has none", "codec")
    stored, shapes = {}, {}
    for key, tensor in tensors.items():
        if compressible(key):
            for part, value in compress_tensor(tensor, density).items():
                stored[f"{key}:{part}"] = value
            shapes[key] = [list(tensor.shape), str(tensor.dtype)]
        else:
            stored[key] = tensor.contiguous()
    return save_safetensors(stored, metadata={_META_KEY: json.dumps(shapes)})


def safetensors_metadata(raw: bytes) -> dict[str, str]:
    header_len = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}


def decode(codec: str, stored: bytes) -> bytes:
    """Stored bytes -> PEFT safetensors bytes (dense tensors, what `peft` loads)."""
    if codec == "none":
        return stored
    tensors = load_safetensors(stored)
    shapes = json.loads(safetensors_metadata(stored)[_META_KEY])
    dense = {k: v for k, v in tensors.items() if ":" not in k}
    for key, (shape, dtype) in shapes.items():
        parts = {p: tensors[f"{key}:{p}"] for p in ("mask", "sign", "scale")}
        dense[key] = decompress_tensor(parts, shape, _DTYPES[dtype])
    return save_safetensors(dense)
