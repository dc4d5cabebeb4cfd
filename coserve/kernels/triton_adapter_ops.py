"""Triton kernels for the batched adapter ops (CUDA), one program per (token, output block).

Same semantics as the references in `coserve.kernels.adapter_ops` (see their docstrings):
token_slots [T] int64 picks each token's slot, -1 = no adapter. On the CPU these run under
TRITON_INTERPRET=1, which is how the tests check them against the references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, out_ptr, in_features, rank,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    rb = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if slot >= 0:
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + t * in_features + k, mask=k < in_features, other=0.0).to(tl.float32)
            a_offsets = slot * rank * in_features + r[:, None] * in_features + k[None, :]
            av = tl.load(a_ptr + a_offsets, mask=(r[:, None] < rank) & (k[None, :] < in_features), other=0.0)
            acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
    tl.store(out_ptr + t * rank + r, acc, mask=r < rank)


@triton.jit
def _lora_expand_kernel(h_ptr, b_ptr, slots_ptr, out_ptr, h_stride, out_stride, out_features, rank,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    nb = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if slot >= 0:
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            hv = tl.load(h_ptr + t * h_stride + r, mask=r < rank, other=0.0).to(tl.float32)
            b_offsets = slot * out_features * rank + n[:, None] * rank + r[None, :]  # Bs [S, out, R]
            bv = tl.load(b_ptr + b_offsets, mask=(n[:, None] < out_features) & (r[None, :] < rank), other=0.0)
            acc += tl.sum(bv.to(tl.float32) * hv[None, :], axis=1)
    tl.store(out_ptr + t * out_stride + n, acc, mask=n < out_features)


@triton.jit
def _road_kernel(y_ptr, c1_ptr, c2_ptr, partner_ptr, slots_ptr, out_ptr, out_features, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < out_features
    slot = tl.load(slots_ptr + t)
    y = tl.load(y_ptr + t * out_features + n, mask=mask, other=0.0).to(tl.float32)
    if slot >= 0:
        base = slot * out_features + n
        c1 = tl.load(c1_ptr + base, mask=mask, other=1.0)
        c2 = tl.load(c2_ptr + base, mask=mask, other=0.0)
        partner = tl.load(partner_ptr + base, mask=mask, other=0)
        yp = tl.load(y_ptr + t * out_features + partner, mask=mask, other=0.0).to(tl.float32)
        y = y * c1 + yp * c2
    tl.store(out_ptr + t * out_features + n, y, mask=mask)


@triton.jit
def _dora_kernel(y_ptr, gain_ptr, slots_ptr, out_ptr, out_features, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < out_features
    slot = tl.load(slots_ptr + t)
    y = tl.load(y_ptr + t * out_features + n, mask=mask, other=0.0).to(tl.float32)
    if slot >= 0:
        y = y * tl.load(gain_ptr + slot * out_features + n, mask=mask, other=1.0)
    tl.store(out_ptr + t * out_features + n, y, mask=mask)


@triton.jit
def _sparse_kernel(x_ptr, rows_ptr, cols_ptr, vals_ptr, slots_ptr, out_ptr, in_features, out_features, nnz,
                   BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        mask = k < nnz
        rows = tl.load(rows_ptr + slot * nnz + k, mask=mask, other=0)
        cols = tl.load(cols_ptr + slot * nnz + k, mask=mask, other=0)
        vals = tl.load(vals_ptr + slot * nnz + k, mask=mask, other=0.0)
        xv = tl.load(x_ptr + t * in_features + cols, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(out_ptr + t * out_features + rows, vals * xv, mask=mask)


def _grid(t: int, n: int, block: int) -> tuple[int, int]:
    return (t, triton.cdiv(n, block))


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    t, in_features = x.shape
    rank = lora_a.shape[1]
    out = torch.empty(t, rank, dtype=torch.float32, device=x.device)
    block_r = max(16, triton.next_power_of_2(min(rank, 64)))
    _lora_shrink_kernel[_grid(t, rank, block_r)](x.contiguous(), lora_a.contiguous(), token_slots, out,
                                                 in_features, rank, BLOCK_R=block_r, BLOCK_K=64)
    return out


def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_bs, token_slots: torch.Tensor) -> torch.Tensor:
    """One launch per output slice, each writing its columns of a float32 delta; added to y once."""
    t, rank = h.shape[0], lora_bs[0].shape[2]
    delta = torch.empty(t, y.shape[1], dtype=torch.float32, device=y.device)
    h = h.float().contiguous()
    block_r = max(16, triton.next_power_of_2(min(rank, 64)))
    col = 0
    for p, b in enumerate(lora_bs):
        n = b.shape[1]
        _lora_expand_kernel[_grid(t, n, 64)](h[:, p * rank :], b.contiguous(), token_slots, delta[:, col:],
                                             h.shape[1], delta.shape[1], n, rank, BLOCK_N=64, BLOCK_R=block_r)
        col += n
    return y.add_(delta.to(y.dtype))


def road_rotate(y, c1, c2, partner, token_slots):
    t, n = y.shape
    out = torch.empty(t, n, dtype=torch.float32, device=y.device)
    _road_kernel[_grid(t, n, 64)](y.contiguous(), c1.contiguous(), c2.contiguous(), partner.contiguous(),
                                  token_slots, out, n, BLOCK_N=64)
    return out.to(y.dtype)


def dora_scale(y, gain, token_slots):
    t, n = y.shape
    out = torch.empty(t, n, dtype=torch.float32, device=y.device)
    _dora_kernel[_grid(t, n, 64)](y.contiguous(), gain.contiguous(), token_slots, out, n, BLOCK_N=64)
    return out.to(y.dtype)


def sparse_delta(x, rows, cols, vals, out_features, token_slots):
    t, in_features = x.shape
    nnz = rows.shape[1]
    out = torch.zeros(t, out_features, dtype=torch.float32, device=x.device)
    if nnz:
        _sparse_kernel[_grid(t, nnz, 128)](x.contiguous(), rows.contiguous(), cols.contiguous(),
                                           vals.float().contiguous(), token_slots, out, in_features, out_features,
                                           nnz, BLOCK_K=128)
    return out.to(x.dtype)
