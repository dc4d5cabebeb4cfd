"""Plain data shared by the adapter methods, the registry and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Projections of a Llama-family layer an adapter may target (Hugging Face names).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_path(layer: int, module: str) -> str:
    """A projection's path in the HF model ("model.layers.3.mlp.down_proj"); PEFT prefixes it with base_model.model."""
    group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{group}.{module}"


class AdapterError(ValueError):
    """An adapter that cannot be served; `field` names the config key or tensor at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, tensor: torch.Tensor, float_only: bool = True) -> None:
    if float_only and tensor.dtype not in _FLOAT_DTYPES:
        raise AdapterError(f"tensor {name} has dtype {tensor.dtype}; adapters must be float16/bfloat16/float32",
                           name)
    # max |x| is NaN or Inf exactly when some entry is (amax propagates NaN); ~8x cheaper than isfinite().all()
    if tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor.abs().amax()):
        raise AdapterError(f"tensor {name} holds NaN or Inf", name)


def take_tensors(
    parts: dict[str, torch.Tensor], prefix: str, method: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """One module's tensors by suffix: refuses strays and missing ones, naming the tensor."""
    stray = sorted(set(parts) - set(required) - set(optional))
    if stray:
        raise AdapterError(f"tensor {prefix}.{stray[0]} is not a {method} tensor", f"{prefix}.{stray[0]}")
    missing = [name for name in required if name not in parts]
    if missing:
        raise AdapterError(f"tensor {prefix}.{missing[0]} is missing", f"{prefix}.{missing[0]}")
    return dict(parts)


@dataclass(frozen=True)
class BaseModelShape:
    """What validation needs to know of the base model."""

    num_layers: int
    module_shapes: dict[str, tuple[int, int]]  # HF module name -> (out_features, in_features)


@dataclass
class ModuleDelta:
    """One adapter's tensors for one (layer, module), already in their serving form (float32)."""

    lora_a: torch.Tensor | None = None  # [r, in]
    lora_b: torch.Tensor | None = None  # [out, r]
    lora_scale: float = 0.0  # alpha / r (or alpha / sqrt(r) with rslora)
    dora_magnitude: torch.Tensor | None = None  # [out]; the gain m / ||W0 + s B A||_row is computed per base
    road_c1: torch.Tensor | None = None  # [out] alpha cos(theta)
    road_c2: torch.Tensor | None = None  # [out] signed alpha sin(theta) (see kernels.adapter_ops.road_rotate)
    road_partner: torch.Tensor | None = None  # [out] int64 paired element within its group
    shira_rows: torch.Tensor | None = None  # [K] int32
    shira_cols: torch.Tensor | None = None  # [K] int32
    shira_vals: torch.Tensor | None = None  # [K]
    gate_tau: float | None = None  # TS-PEFT: update only tokens whose update/base norm ratio is >= this

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]

    def nbytes(self) -> int:
        tensors = [t for t in self.__dict__.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class LoadedAdapter:
    name: str
    method: str  # LORA | DORA | ROAD | SHIRA (DORA is LORA with use_dora)
    config: dict[str, Any]
    modules: dict[tuple[int, str], ModuleDelta] = field(default_factory=dict)  # (layer, module) -> delta

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.modules.values())
