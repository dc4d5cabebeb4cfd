"""RoAd (PEFT peft_type ROAD): grouped 2-D rotations of the layer output, elementwise per token.

z = y * c1 + rotate_half_grouped(y) * c2 with c1 = alpha cos(theta), c2 = alpha sin(theta); within each
group of group_size outputs, element j pairs with j + group_size/2.
"""

from __future__ import annotations

from typing import Any

import torch

from coserve.adapters.types import AdapterError, ModuleDelta, check_tensor, take_tensors

CONFIG_KEYS = {"variant", "group_size"}
_SIZE_FACTOR = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameters per output feature


def method_name(config: dict[str, Any]) -> str:
    return "ROAD"


def check_config(config: dict[str, Any]) -> None:
    if config.get("variant", "road_1") not in _SIZE_FACTOR:
        raise AdapterError(f"variant must be one of {sorted(_SIZE_FACTOR)}", "variant")
    g = config.get("group_size", 64)
    if not isinstance(g, int) or g < 2 or g % 2:
        raise AdapterError(f"group_size must be a positive even integer, got {g!r}", "group_size")


def columns(variant: str, g: int, theta: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha cos theta, alpha sin theta), each [out], laid out as PEFT's RoAd variants define."""
    if variant == "road_1":
        theta = theta.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.reshape(-1, 2, g), alpha.reshape(-1, 2, g)
    return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()


def rotation_tables(first: torch.Tensor, second: torch.Tensor, g: int) -> tuple[torch.Tensor, ...]:
    """c1, signed c2 and partner indices [out] for kernels.adapter_ops.road_rotate."""
    out = first.numel()
    j = torch.arange(out)
    in_first_half = (j % g) < g // 2
    partner = torch.where(in_first_half, j + g // 2, j - g // 2)
    signed = torch.where(in_first_half, -second, second)
    return first, signed, partner


def parse_module(
    config: dict[str, Any], parts: dict[str, torch.Tensor], prefix: str, module: str, out_f: int, in_f: int,
    max_rank: int,
) -> ModuleDelta:
    variant, g = config.get("variant", "road_1"), config.get("group_size", 64)
    got = take_tensors(parts, prefix, "RoAd", ("road_theta", "road_alpha"))
    theta, alpha = got["road_theta"], got["road_alpha"]
    if out_f % g:
        raise AdapterError(f"group_size {g} does not divide {prefix}'s {out_f} outputs", "group_size")
    size = int(out_f * _SIZE_FACTOR[variant])
    for suffix, t in (("road_theta", theta), ("road_alpha", alpha)):
        check_tensor(f"{prefix}.{suffix}", t)
        if t.shape != (size,):
            raise AdapterError(f"tensor {prefix}.{suffix} has shape {tuple(t.shape)}; {variant} expects [{size}]",
                               f"{prefix}.{suffix}")
    c1, c2, partner = rotation_tables(*columns(variant, g, theta.float(), alpha.float()), g)
    return ModuleDelta(road_c1=c1, road_c2=c2, road_partner=partner)
