"""Batched adapter ops for mixed batches: every token may use a different adapter slot.

Common arguments:
    token_slots: [T] int64, the device slot of each token's adapter; -1 = base model only.
    S slots, each holding one adapter's tensors for this module (zero-padded where unused).

Each op has a pure-torch reference (`*_ref`, one token at a time: the semantics) and a
fast CPU path (same name), which groups tokens by slot (SGMV) when segments are long and
gathers per-token weights (BGMV) when each slot has only a few tokens (decode).
The Triton versions for CUDA live in `coserve.kernels.triton_adapter_ops`; the fast paths hand
CUDA tensors to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GATHER_MAX_TOKENS_PER_SEGMENT = 4  # at or below this mean segment length, gather per token (BGMV)


@dataclass
class Segments:
    """Tokens grouped by slot: built once per step, shared by every adapted module."""

    token_slots: torch.Tensor  # [T] int64, -1 = no adapter
    slots: list[int]  # distinct slots present (>= 0)
    rows: list[torch.Tensor]  # for each slot, its token rows [n_s] int64
    active_rows: torch.Tensor  # [T'] rows with any adapter
    active_slots: torch.Tensor  # [T'] their slots

    @classmethod
    def build(cls, token_slots: torch.Tensor) -> Segments:
        active = (token_slots >= 0).nonzero().flatten()
        slots_of_active = token_slots[active]
        unique = torch.unique(slots_of_active).tolist()
        rows = [active[slots_of_active == s] for s in unique]
        return cls(token_slots, unique, rows, active, slots_of_active)

    @property
    def use_gather(self) -> bool:
        return bool(self.slots) and self.active_rows.numel() <= GATHER_MAX_TOKENS_PER_SEGMENT * len(self.slots)


# ---------------------------------------------------------------- LoRA shrink / expand
def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Semantics: h[t] = A[slot_t] @ x[t] for tokens with a slot, 0 otherwise.

    x [T, in], lora_a [S, R, in] (rank-padded with zeros), token_slots [T] -> h [T, R] float32.
    """
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32)
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            out[t] = lora_a[s].float() @ x[t].float()
    return out


def lora_expand_ref(
    h: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, token_slots: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Semantics: delta[t] = scale[slot_t] * B[slot_t] @ h[t] for tokens with a slot, 0 otherwise.

    h [T, R] float32, lora_b [S, out, R], scale [S] float32 -> delta [T, out] in out_dtype.
    """
    out = torch.zeros(h.shape[0], lora_b.shape[1], dtype=torch.float32)
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            out[t] = scale[s] * (lora_b[s].float() @ h[t])
    return out.to(out_dtype)


def _triton():
    from coserve.kernels import triton_adapter_ops

    return triton_adapter_ops


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Fast path of lora_shrink_ref (same semantics); matmuls in x's dtype, result float32."""
    if x.is_cuda:
        return _triton().lora_shrink(x, lora_a, seg.token_slots)
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32)
    if not seg.slots:
        return out
    if seg.use_gather:  # BGMV: [T', 1, in] @ [T', in, R]
        xa = x[seg.active_rows].unsqueeze(1)
        out[seg.active_rows] = torch.bmm(xa, lora_a[seg.active_slots].to(x.dtype).transpose(1, 2)).squeeze(1).float()
        return out
    for s, rows in zip(seg.slots, seg.rows):  # SGMV: one matmul per slot's token segment
        out[rows] = (x[rows] @ lora_a[s].to(x.dtype).T).float()
    return out


def lora_expand(
    h: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, seg: Segments, out_dtype: torch.dtype
) -> torch.Tensor:
    """Fast path of lora_expand_ref (same semantics)."""
    if h.is_cuda:
        return _triton().lora_expand(h, lora_b, scale, seg.token_slots, out_dtype)
    out = torch.zeros(h.shape[0], lora_b.shape[1], dtype=out_dtype)
    if not seg.slots:
        return out
    if seg.use_gather:
        hb = (h[seg.active_rows] * scale[seg.active_slots][:, None]).to(out_dtype).unsqueeze(1)  # [T', 1, R]
        out[seg.active_rows] = torch.bmm(hb, lora_b[seg.active_slots].to(out_dtype).transpose(1, 2)).squeeze(1)
        return out
    for s, rows in zip(seg.slots, seg.rows):
        out[rows] = ((h[rows] * scale[s]).to(out_dtype) @ lora_b[s].to(out_dtype).T)
    return out


# ---------------------------------------------------------------- DoRA scale
def dora_scale_ref(y: torch.Tensor, gain: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Semantics: y[t] * gain[slot_t] (per output channel), unchanged for tokens without a slot.

    y [T, out], gain [S, out] (ones for slots without DoRA) -> [T, out] in y's dtype.
    """
    out = y.clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            out[t] = (y[t].float() * gain[s].float()).to(y.dtype)
    return out


def dora_scale(y: torch.Tensor, gain: torch.Tensor, seg: Segments) -> torch.Tensor:
    if y.is_cuda:
        return _triton().dora_scale(y, gain, seg.token_slots)
    out = y.clone()
    if seg.slots:
        rows = seg.active_rows
        out[rows] = (y[rows].float() * gain[seg.active_slots].float()).to(y.dtype)
    return out


# ---------------------------------------------------------------- RoAd rotation
def road_rotate_ref(
    y: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, partner: torch.Tensor, token_slots: torch.Tensor
) -> torch.Tensor:
    """Semantics: z[t, j] = y[t, j] * c1[s, j] + y[t, partner[s, j]] * c2[s, j], s = slot_t.

    Within each group of g outputs, element j pairs with j + g/2 (RoAd's grouped 2-D rotations);
    `partner` [S, out] int64 holds that pairing and c2 carries the rotation's sign
    (-alpha sin on a group's first half, +alpha sin on its second), so any group size per slot works.
    y [T, out], c1 / c2 [S, out] float32 -> [T, out] in y's dtype; tokens without a slot unchanged.
    """
    out = y.clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            yt = y[t].float()
            out[t] = (yt * c1[s] + yt[partner[s]] * c2[s]).to(y.dtype)
    return out


def road_rotate(
    y: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, partner: torch.Tensor, seg: Segments
) -> torch.Tensor:
    if y.is_cuda:
        return _triton().road_rotate(y, c1, c2, partner, seg.token_slots)
    out = y.clone()
    if seg.slots:
        rows, slots = seg.active_rows, seg.active_slots
        ya = y[rows].float()  # [T', out]
        out[rows] = (ya * c1[slots] + torch.gather(ya, 1, partner[slots]) * c2[slots]).to(y.dtype)
    return out


# ---------------------------------------------------------------- SHiRA sparse delta
def sparse_delta_ref(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, out_features: int,
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """Semantics: delta[t, rows[s, k]] += vals[s, k] * x[t, cols[s, k]] over k, s = slot_t (S x_t, S sparse).

    x [T, in], rows / cols [S, K] int64, vals [S, K] float32 (zero-padded) -> delta [T, out] in x's dtype.
    """
    out = torch.zeros(x.shape[0], out_features, dtype=torch.float32)
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            out[t].index_add_(0, rows[s], vals[s] * x[t].float()[cols[s]])
    return out.to(x.dtype)


def sparse_delta(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, out_features: int, seg: Segments
) -> torch.Tensor:
    """Per slot segment: contributions [n_s, K] scattered into the output rows; kept sparse."""
    if x.is_cuda:
        return _triton().sparse_delta(x, rows, cols, vals, out_features, seg.token_slots)
    out = torch.zeros(x.shape[0], out_features, dtype=torch.float32)
    for s, tok in zip(seg.slots, seg.rows):
        contrib = x[tok].float()[:, cols[s]] * vals[s]  # [n_s, K]
        block = torch.zeros(tok.numel(), out_features, dtype=torch.float32)
        block.index_add_(1, rows[s], contrib)
        out[tok] = block
    return out.to(x.dtype)
