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

PAD_WASTE_LIMIT = 4  # grouped bmm while padded rows <= this many times the real ones


@dataclass
class Segments:
    """Tokens grouped by slot: built once per step, shared by every adapted module.

    The grouped layout pads each slot's tokens to the longest group, so one batched matmul over
    [slots, G, features] reads each slot's weights once (BGMV/SGMV in one call); when padding
    would waste too much (one hot adapter among many cold ones), ops loop over segments instead.
    """

    token_slots: torch.Tensor  # [T] int64, -1 = no adapter
    slots: list[int]  # distinct slots present (>= 0)
    rows: list[torch.Tensor]  # for each slot, its token rows [n_s] int64
    active_rows: torch.Tensor  # [T'] rows with any adapter, ascending
    active_slots: torch.Tensor  # [T'] their slots
    group_slots: torch.Tensor  # [S'] the distinct slots as a tensor
    sorted_rows: torch.Tensor  # [T'] active rows ordered by slot
    padded_index: torch.Tensor  # [T'] position of each sorted row in the [S' * G] padded layout
    group_len: int  # G, the longest group

    @classmethod
    def build(cls, token_slots: torch.Tensor) -> Segments:
        active = (token_slots >= 0).nonzero().flatten()
        slots_of_active = token_slots[active]
        order = torch.argsort(slots_of_active, stable=True)
        sorted_rows, sorted_slots = active[order], slots_of_active[order]
        group_slots, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
        group_len = int(counts.max()) if counts.numel() else 0
        starts = torch.cumsum(counts, 0) - counts
        group_of = torch.repeat_interleave(torch.arange(group_slots.numel()), counts)
        position = torch.arange(sorted_rows.numel()) - torch.repeat_interleave(starts, counts)
        unique = group_slots.tolist()
        rows = list(torch.split(sorted_rows, counts.tolist())) if unique else []
        return cls(token_slots, unique, rows, active, slots_of_active, group_slots, sorted_rows,
                   group_of * group_len + position, group_len)

    @property
    def use_grouped(self) -> bool:
        return bool(self.slots) and len(self.slots) * self.group_len <= PAD_WASTE_LIMIT * self.active_rows.numel()

    @property
    def no_padding(self) -> bool:
        """Every group is full (e.g. decodes spread evenly): the padded layout is the sorted rows as is."""
        return len(self.slots) * self.group_len == self.sorted_rows.numel()

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        """Rows of `values` [T', F] in sorted-row order -> zero-padded groups [S', G, F]."""
        if self.no_padding:
            return values.view(len(self.slots), self.group_len, values.shape[1])
        padded = values.new_zeros(len(self.slots) * self.group_len, values.shape[1])
        padded[self.padded_index] = values
        return padded.view(len(self.slots), self.group_len, values.shape[1])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[S', G, F] -> [T', F] in sorted-row order."""
        if self.no_padding:
            return padded.reshape(-1, padded.shape[-1])
        return padded.reshape(-1, padded.shape[-1])[self.padded_index]


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
    h: torch.Tensor, lora_bt: torch.Tensor, scale: torch.Tensor, token_slots: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Semantics: delta[t] = scale[slot_t] * B[slot_t] @ h[t] for tokens with a slot, 0 otherwise.

    h [T, R] float32, lora_bt [S, R, out] (B transposed, rank-padded), scale [S] float32
    -> delta [T, out] in out_dtype.
    """
    out = torch.zeros(h.shape[0], lora_bt.shape[2], dtype=torch.float32)
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            out[t] = scale[s] * (h[t] @ lora_bt[s].float())
    return out.to(out_dtype)


def _triton():
    from coserve.kernels import triton_adapter_ops

    return triton_adapter_ops


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Fast path of lora_shrink_ref (same semantics); float32 matmuls (CPU bfloat16 bmm is far slower)."""
    if x.is_cuda:
        return _triton().lora_shrink(x, lora_a, seg.token_slots)
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32)
    if not seg.slots:
        return out
    if seg.use_grouped:  # [S', G, in] @ [S', in, R]: each slot's A read once
        a = lora_a.index_select(0, seg.group_slots).float()
        h = torch.bmm(seg.pad(x.index_select(0, seg.sorted_rows).float()), a.transpose(1, 2))  # [S', G, R]
        return out.index_copy_(0, seg.sorted_rows, seg.unpad(h))
    for s, rows in zip(seg.slots, seg.rows):  # SGMV: one matmul per slot's token segment
        out.index_copy_(0, rows, x.index_select(0, rows).float() @ lora_a[s].float().T)
    return out


def lora_expand(
    h: torch.Tensor, lora_bt: torch.Tensor, scale: torch.Tensor, seg: Segments, out_dtype: torch.dtype
) -> torch.Tensor:
    """Fast path of lora_expand_ref (same semantics); float32 matmuls, result in out_dtype."""
    if h.is_cuda:
        return _triton().lora_expand(h, lora_bt, scale, seg.token_slots, out_dtype)
    out = torch.zeros(h.shape[0], lora_bt.shape[2], dtype=out_dtype)
    if not seg.slots:
        return out
    if seg.use_grouped:  # [S', G, R] @ [S', R, out]: each slot's B read once
        rows = seg.sorted_rows
        hs = h.index_select(0, rows) * scale.index_select(0, seg.token_slots.index_select(0, rows))[:, None]
        bt = lora_bt.index_select(0, seg.group_slots).float()
        return out.index_copy_(0, rows, seg.unpad(torch.bmm(seg.pad(hs), bt)).to(out_dtype))
    for s, rows in zip(seg.slots, seg.rows):
        out.index_copy_(0, rows, ((h.index_select(0, rows) * scale[s]) @ lora_bt[s].float()).to(out_dtype))
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
        scaled = y.index_select(0, rows).float() * gain.index_select(0, seg.active_slots).float()
        out.index_copy_(0, rows, scaled.to(y.dtype))
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
    y: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, partner: torch.Tensor, seg: Segments,
    group_size: int = 0,
) -> torch.Tensor:
    """road_rotate_ref; `group_size` g > 0 promises that every active slot's partner is j +- g/2 within
    aligned groups of g, so the CPU path swaps the halves of each group (a flip) instead of gathering."""
    if y.is_cuda:
        return _triton().road_rotate(y, c1, c2, partner, seg.token_slots)
    if not seg.slots:
        return y
    if seg.use_grouped:  # each slot's tables read once and broadcast over its tokens
        rows = seg.sorted_rows
        yp = seg.pad(y.index_select(0, rows))  # [S', G, out]
        c1s, c2s = c1.index_select(0, seg.group_slots)[:, None], c2.index_select(0, seg.group_slots)[:, None]
        paired = _swap_halves(yp, group_size) if group_size else \
            torch.gather(yp, 2, partner.index_select(0, seg.group_slots)[:, None].expand_as(yp))
        rotated = seg.unpad((yp * c1s).addcmul_(paired, c2s)).to(y.dtype)
        if rows.numel() == y.shape[0]:
            return torch.empty_like(y).index_copy_(0, rows, rotated)
        return y.clone().index_copy_(0, rows, rotated)
    rows, slots = seg.active_rows, seg.active_slots
    every_row = rows.numel() == y.shape[0]
    ya = y if every_row else y.index_select(0, rows)  # [T', out]
    c1s, c2s = c1.index_select(0, slots), c2.index_select(0, slots)  # [T', out] float32
    paired = _swap_halves(ya, group_size) if group_size else torch.gather(ya, 1, partner.index_select(0, slots))
    rotated = (ya * c1s).addcmul_(paired, c2s).to(y.dtype)  # float32 arithmetic, one rounding
    if every_row:
        return rotated
    return y.clone().index_copy_(0, rows, rotated)


def _swap_halves(y: torch.Tensor, g: int) -> torch.Tensor:
    """[..., out] -> the same with the two halves of every aligned group of g columns swapped."""
    lead = y.shape[:-1]
    return y.reshape(*lead, -1, 2, g // 2).flip(-2).reshape(*lead, y.shape[-1])


# ---------------------------------------------------------------- SHiRA sparse delta
def sparse_csr(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """One slot's sparse delta as a [out, in] CSR tensor (duplicates summed)."""
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals.float(), shape, check_invariants=True)
    return coo.coalesce().to_sparse_csr()


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
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, out_features: int, seg: Segments,
    csr: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Per slot segment: S_s x for the segment's tokens; kept sparse. `csr` optionally holds each slot's
    matrix as a [out, in] sparse CSR tensor (built once when the slot is loaded), which is much faster."""
    if x.is_cuda:
        return _triton().sparse_delta(x, rows, cols, vals, out_features, seg.token_slots)
    out = torch.zeros(x.shape[0], out_features, dtype=torch.float32)
    if csr is not None:
        for s, tok in zip(seg.slots, seg.rows):
            if csr[s] is not None:
                out.index_copy_(0, tok, (csr[s] @ x.index_select(0, tok).float().T).T)
        return out.to(x.dtype)
    for s, tok in zip(seg.slots, seg.rows):
        contrib = x[tok].float()[:, cols[s]] * vals[s]  # [n_s, K]
        block = torch.zeros(tok.numel(), out_features, dtype=torch.float32)
        block.index_add_(1, rows[s], contrib)
        out[tok] = block
    return out.to(x.dtype)


# ---------------------------------------------------------------- TS-PEFT token gate
GATE_EPS = 1e-6


def update_ratio(update: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Semantics: r[t] = ||update[t]|| / (||base[t]|| + 1e-6), in float32.

    update, base [T, out] -> [T]. The TS-PEFT gate keeps a token's adapter update when r >= tau."""
    return update.float().norm(dim=1) / (base.float().norm(dim=1) + GATE_EPS)


def gate_updates(base: torch.Tensor, adapted: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Semantics: row t is adapted[t] when ||adapted[t] - base[t]|| / ||base[t]|| >= tau[t], else base[t].

    base, adapted [T, out] (the projection's output without / with the adapter), tau [T] float32 (0 keeps
    every row) -> [T, out] in adapted's dtype."""
    keep = update_ratio(adapted - base, base) >= tau
    return torch.where(keep[:, None], adapted, base)
