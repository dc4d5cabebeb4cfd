"""Compute-dtype linears with their weight pre-packed for oneDNN (CPU), as a pass after quantization.

A bfloat16 `F.linear` on the CPU hands the weight to oneDNN in its plain [out, in] layout, and oneDNN
reorders it into its blocked layout on every call: for a decode step that costs more than the matmul
(demo-small, 3,072 x 576 at one row: 119 us plain vs 40 us pre-packed). Packing once at load time
gives bit-identical outputs (the same oneDNN kernel runs) at 1.2-3.5x the speed. The pass applies to
the linears left in a 16-bit compute dtype (all of them when `quantize=none`, the lm_head and any
linear the int4 kernel cannot take otherwise); float32 stays on MKL's sgemm, which needs no reorder.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

PACKABLE_DTYPES = (torch.bfloat16, torch.float16)


@cache
def packing_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this build and CPU pack `dtype` linears (oneDNN refuses, say, float16 without AVX512-FP16)."""
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype))
    except (RuntimeError, AttributeError):
        return False
    return True


class _PackedMatmul(torch.autograd.Function):
    """Semantics: y = x W^T + b with W held pre-packed; backward gives dx = dy W (no dW, no db: the
    base is frozen). x [..., in] -> y [..., out]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, linear: PackedLinear) -> torch.Tensor:
        ctx.linear = linear
        return linear.packed_matmul(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return dy @ ctx.linear.plain_weight(dy.dtype), None  # [..., out] @ [out, in]


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight lives in oneDNN's blocked layout. `plain_weight` gives the
    [out, in] matrix back (the tied embedding when there is one, else unpacked on demand)."""

    def __init__(self, linear: nn.Linear, plain: torch.Tensor | None = None):
        super().__init__()
        weight = linear.weight.detach()  # [out, in]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight), persistent=False)
        self.bias = linear.bias
        self._plain = plain  # a tensor that already holds the plain weight (a tied embedding), else None

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")

    def plain_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[out, in] in the compute dtype, or in `dtype`."""
        weight = self._plain if self._plain is not None else self.packed_weight.to_dense()
        return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.plain_weight(torch.float32)  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedMatmul.apply(x, self)
        return self.packed_matmul(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> int:
    """Replace every CPU nn.Linear held in a 16-bit dtype by a PackedLinear (in place); returns how many.
    Run after quantization (it leaves the lm_head and any shape its kernel cannot take as nn.Linear)."""
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = embedding.weight if isinstance(embedding, nn.Embedding) else None
    done = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            if not packing_available(child.weight.dtype):
                continue
            plain = tied.detach() if tied is not None and child.weight is tied else None
            setattr(module, child_name, PackedLinear(child, plain=plain))
            done += 1
    return done
