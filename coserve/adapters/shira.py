"""SHiRA (PEFT peft_type SHIRA): a sparse weight delta, y = W0 x + S x, kept as (rows, cols, values)."""

from __future__ import annotations

from typing import Any

import torch

from coserve.adapters.types import AdapterError, ModuleDelta, check_tensor, take_tensors

CONFIG_KEYS = {"r", "mask_type", "random_seed"}


def method_name(config: dict[str, Any]) -> str:
    return "SHIRA"


def check_config(config: dict[str, Any]) -> None:
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise AdapterError(f"r must be a positive integer, got {r!r}", "r")


def parse_module(
    config: dict[str, Any], parts: dict[str, torch.Tensor], prefix: str, module: str, out_f: int, in_f: int,
    max_rank: int,
) -> ModuleDelta:
    got = take_tensors(parts, prefix, "SHiRA", ("shira_weight", "shira_indices"))
    values, indices = got["shira_weight"], got["shira_indices"]
    check_tensor(f"{prefix}.shira_weight", values)
    if indices.dtype not in (torch.int32, torch.int64):
        raise AdapterError(f"tensor {prefix}.shira_indices must be int32/int64, got {indices.dtype}",
                           f"{prefix}.shira_indices")
    k = values.numel()
    if values.dim() != 1 or indices.shape != (2, k):
        raise AdapterError(f"tensor {prefix}.shira_indices has shape {tuple(indices.shape)}; expected [2, {k}]",
                           f"{prefix}.shira_indices")
    if k > out_f * in_f:
        raise AdapterError(f"{prefix} has {k} sparse values, more than its {out_f}x{in_f} weight",
                           f"{prefix}.shira_weight")
    rows, cols = indices[0].to(torch.int32), indices[1].to(torch.int32)  # int32: 8 bytes an entry less, host-cached
    if k and (indices.min() < 0 or indices[0].max() >= out_f or indices[1].max() >= in_f):
        raise AdapterError(f"tensor {prefix}.shira_indices points outside the {out_f}x{in_f} weight",
                           f"{prefix}.shira_indices")
    return ModuleDelta(shira_rows=rows, shira_cols=cols, shira_vals=values.float())
