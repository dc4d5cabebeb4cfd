"""Weight-only quantization as a pass over a loaded model.

int8: per output channel, symmetric: w ~= q * scale, q in [-127, 127].
int4: group-wise along the input dimension, asymmetric: w ~= (q - 8) * scale + zero,
      q in [0, 15], one (scale, zero) per group of `group_size` inputs.
Matmuls run through PyTorch's own weight-only kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu` on CPU; `_weight_int4pack_mm` on CUDA).
Embeddings and lm_head stay in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

QUANTIZE_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
_SKIP = ("lm_head",)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # [N, K]
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # [N]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", q)  # [N, K] int8
        self.register_buffer("scales", scales.to(linear.weight.dtype))  # [N]
        self.bias = linear.bias

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]  # [N, K] float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # [M, K]
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        y = torch._weight_int8pack_mm(x2, self.qweight, scales)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        w = linear.weight.detach().float()  # [N, K]
        n, k = w.shape
        groups = w.reshape(n, k // group_size, group_size)
        w_max, w_min = groups.amax(-1, keepdim=True), groups.amin(-1, keepdim=True)
        scales = (w_max - w_min).clamp(min=1e-6) / 15.0
        zeros = w_min + scales * 8.0
        q = ((groups - w_min) / scales).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        dtype = linear.weight.dtype
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.on_cuda = w.is_cuda
        if self.on_cuda:
            packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        self.register_buffer("qweight", packed)
        # [K/G, N, 2]: (scale, zero) per group and output channel
        sz = torch.stack([scales.squeeze(-1), zeros.squeeze(-1)], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(dtype))
        self.register_buffer("_q_unpacked", q.to(torch.uint8), persistent=False)  # for dequantization
        self.bias = linear.bias

    def dequantized_weight(self) -> torch.Tensor:
        sz = self.scales_and_zeros.float().transpose(0, 1)  # [N, K/G, 2]
        q = self._q_unpacked.float().reshape(self.out_features, -1, self.group_size)
        return ((q - 8.0) * sz[..., :1] + sz[..., 1:]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # [M, K]
        sz = self.scales_and_zeros if self.scales_and_zeros.dtype == x.dtype else self.scales_and_zeros.to(x.dtype)
        if self.on_cuda:
            y = torch._weight_int4pack_mm(x2, self.qweight, self.group_size, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, sz)
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


@dataclass
class QuantizeReport:
    mode: str
    group_size: int | None
    num_quantized: int
    num_kept: int  # linears left in the compute dtype (shapes the kernel cannot take)
    linear_bytes: int  # bytes of all linear weights after the pass (incl. scales)


def _int4_group_for(k: int, n: int, preferred: int) -> int | None:
    if n % 8 or k % 16:
        return None
    for g in (preferred,) + tuple(sorted(INT4_GROUP_SIZES, reverse=True)):
        if k % g == 0:
            return g
    return None


def module_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters(recurse=False)) + [
        b for name, b in module.named_buffers(recurse=False) if not name.startswith("_")
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def quantize_model(model: nn.Module, mode: str, group_size: int = 128) -> QuantizeReport:
    """Replace every nn.Linear but lm_head by its quantized counterpart (in place)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    done = kept = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or full.endswith(_SKIP) or mode == "none":
                continue
            if mode == "int8":
                new: nn.Module = Int8Linear(child)
            else:
                g = _int4_group_for(child.in_features, child.out_features, group_size)
                if g is None:
                    kept += 1
                    continue
                new = Int4Linear(child, g)
            setattr(module, child_name, new)
            done += 1
    linear_types = (nn.Linear, Int8Linear, Int4Linear)
    total = sum(module_bytes(m) for n, m in model.named_modules() if isinstance(m, linear_types) and n != "lm_head")
    return QuantizeReport(mode, group_size if mode == "int4" else None, done, kept, total)
