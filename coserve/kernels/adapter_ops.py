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
DIRECT_EXPAND_ROWS = 16  # grouped LoRA expand as h Bs^T (no transposes) from this many rows a slot


@dataclass
class Segments:
    """Tokens grouped by slot: built once per step, shared by every adapted module.

    The grouped layout pads each slot's tokens to the longest group, so one batched matmul over
    [groups, G, features] reads each slot's weights once (BGMV/SGMV in one call); when padding
    would waste too much (one hot adapter among many cold ones), ops loop over segments instead.
    When the slots present are a contiguous range lo..hi (slots are handed out from 0, so with few
    adapters they usually are), a step's weights are a slice of the slot buffer (a view, no gather
    copy). A range with holes is gathered instead: reading the holes' weights cost more than the
    copy (64 requests over 32 adapters on every other slot: 294 tok/s as a range, 401 gathered).
    """

    token_slots: torch.Tensor  # [T] int64, -1 = no adapter
    slots: list[int]  # distinct slots present (>= 0)
    rows: list[torch.Tensor]  # for each slot, its token rows [n_s] int64
    active_rows: torch.Tensor  # [T'] rows with any adapter, ascending
    active_slots: torch.Tensor  # [T'] their slots
    group_slots: torch.Tensor  # [S'] the distinct slots, ascending (the slot of each padded group)
    sorted_rows: torch.Tensor  # [T'] active rows ordered by slot
    padded_index: torch.Tensor  # [T'] position of each sorted row in the [S' * G] padded layout
    group_len: int  # G, the longest group
    slot_range: tuple[int, int] | None = None  # (lo, hi + 1) when the slots present are exactly that range
    # The active rows are rows 0..T'-1, already in slot order, and no group is padded: gather / pad / unpad
    # are views (the runner orders each step's sequences by slot, base-model rows last, to make this the rule)
    in_order: bool = False

    @classmethod
    def build(cls, token_slots: torch.Tensor) -> Segments:
        active = (token_slots >= 0).nonzero().flatten()
        slots_of_active = token_slots[active]
        order = torch.argsort(slots_of_active, stable=True)
        sorted_rows, sorted_slots = active[order], slots_of_active[order]
        present, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
        group_len = int(counts.max()) if counts.numel() else 0
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(sorted_rows.numel()) - torch.repeat_interleave(starts, counts)
        unique = present.tolist()
        rows = list(torch.split(sorted_rows, counts.tolist())) if unique else []
        contiguous = bool(unique) and unique[-1] - unique[0] + 1 == len(unique)
        group_of = torch.repeat_interleave(torch.arange(present.numel()), counts)
        seg = cls(token_slots, unique, rows, active, slots_of_active, present, sorted_rows,
                  group_of * group_len + position, group_len, (unique[0], unique[-1] + 1) if contiguous else None)
        seg.in_order = bool(unique) and seg.no_padding and torch.equal(sorted_rows, torch.arange(sorted_rows.numel()))
        return seg

    @property
    def num_active(self) -> int:
        return self.sorted_rows.numel()

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """[T, F] -> [T', F] the active rows in slot order (a view when they are in order)."""
        return values[: self.num_active] if self.in_order else values.index_select(0, self.sorted_rows)

    def put(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """out[active rows] = values [T', F] (slot order), in place; returns out."""
        if self.in_order:
            out[: self.num_active] = values
            return out
        return out.index_copy_(0, self.sorted_rows, values)

    def scatter(self, values: torch.Tensor, rest: torch.Tensor | None) -> torch.Tensor:
        """[T', F] in slot order -> [T, F] holding values at the active rows and rest's rows (zeros when
        rest is None) elsewhere; values itself when the active rows are every row, in order."""
        t = self.token_slots.numel()
        if self.num_active == t:
            return values if self.in_order else self.put(values.new_empty(t, values.shape[1]), values)
        return self.put(values.new_zeros(t, values.shape[1]) if rest is None else rest.clone(), values)

    def add(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """out[active rows] += values [T', F] (slot order), in place; returns out."""
        if self.in_order:
            out[: self.num_active].add_(values)
            return out
        return out.index_add_(0, self.sorted_rows, values)

    def group_weights(self, per_slot: torch.Tensor) -> torch.Tensor:
        """[S, ...] slot buffer -> [S', ...] the rows of the padded groups (a view over a slot range)."""
        if self.slot_range is not None:
            return per_slot[self.slot_range[0] : self.slot_range[1]]
        return per_slot.index_select(0, self.group_slots)

    @property
    def use_grouped(self) -> bool:
        padded = self.group_slots.numel() * self.group_len
        return bool(self.slots) and padded <= PAD_WASTE_LIMIT * self.active_rows.numel()

    @property
    def no_padding(self) -> bool:
        """Every group is full (e.g. decodes spread evenly): the padded layout is the sorted rows as is."""
        return self.group_slots.numel() * self.group_len == self.sorted_rows.numel()

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        """Rows of `values` [T', F] in sorted-row order -> zero-padded groups [S', G, F]."""
        groups = self.group_slots.numel()
        if self.no_padding:  # a view when values is contiguous
            return values.reshape(groups, self.group_len, values.shape[1])
        padded = values.new_zeros(groups * self.group_len, values.shape[1])
        padded[self.padded_index] = values
        return padded.view(groups, self.group_len, values.shape[1])

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
    y: torch.Tensor, h: torch.Tensor, lora_bs: tuple[torch.Tensor, ...], token_slots: torch.Tensor
) -> torch.Tensor:
    """Semantics: y + delta, where for every slice p (y's columns split in order into widths n_p)
    delta[t, slice p] = Bs_p[slot_t] @ h[t, p*R:(p+1)*R] for tokens with a slot, 0 otherwise.

    A packed projection (q/k/v, gate/up) has one slice per part, as vLLM's expand takes a B per
    output slice, in PEFT's lora_B layout as vLLM stacks it. The LoRA scale is folded into Bs
    (Bs_p = s * B_p, rank-padded with zeros).
    y [T, sum n_p], h [T, P*R] float32, lora_bs P tensors [S, n_p, R] -> [T, sum n_p] in y's dtype;
    delta is computed in float32 and rounded to y's dtype before it is added.
    """
    rank = lora_bs[0].shape[2]
    delta = torch.zeros(y.shape[0], sum(b.shape[1] for b in lora_bs), dtype=torch.float32)
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            delta[t] = torch.cat([b[s].float() @ h[t, p * rank : (p + 1) * rank] for p, b in enumerate(lora_bs)])
    return y + delta.to(y.dtype)


def _triton():
    from coserve.kernels import triton_adapter_ops

    return triton_adapter_ops


# The slot buffers hold the model's compute dtype: a bfloat16 model reads half the bytes per step, the
# cost that dominates when many adapters share a step. The CPU fast paths multiply in that dtype (float32
# accumulation, one rounding) and match the references within that dtype's rounding. Converting the
# weights to float32 first costs more than it saves even at 1-2 rows per slot (64 decodes over 32
# adapters: shrink of a packed qkv 52 vs 97 us, expand of gate/up 58 vs 79 us).


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Fast path of lora_shrink_ref (same semantics)."""
    if x.is_cuda:
        return _triton().lora_shrink(x, lora_a, seg.token_slots)
    t, width = x.shape[0], lora_a.shape[1]
    if not seg.slots:
        return torch.zeros(t, width)
    if seg.use_grouped:  # [S', G, in] @ [S', in, R]: each slot's A read once
        a = seg.group_weights(lora_a)  # [S', R, in]
        h = seg.unpad(torch.bmm(seg.pad(seg.gather(x).to(a.dtype)), a.transpose(1, 2))).float()  # [T', R]
        return seg.scatter(h, None)
    out = torch.empty(t, width) if seg.num_active == t else torch.zeros(t, width)
    for s, seg_rows in zip(seg.slots, seg.rows):  # SGMV: one matmul per slot's token segment
        out.index_copy_(0, seg_rows, (x.index_select(0, seg_rows).to(lora_a.dtype) @ lora_a[s].T).float())
    return out


def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_bs: tuple[torch.Tensor, ...], seg: Segments) -> torch.Tensor:
    """Fast path of lora_expand_ref (same semantics), adding into y in place (and returning it).

    Grouped, few rows a slot (G < DIRECT_EXPAND_ROWS): one batched matmul per slice in the transposed form
    delta^T = Bs h^T ([S', n_p, R] @ [S', R, G]), which streams the [S, n, R] buffers 1.3-1.6x faster than
    h @ Bs^T on the CPU (64 decodes over 32 adapters, a 1,536-wide slice: 81 vs 126 us), each slot's Bs
    read once. The slices are laid side by side (one copy) and added to y's rows at once: adding a
    transposed delta slice by slice in place reads it strided and cost more than the copy.
    Many rows a slot: h @ Bs^T ([S', G, R] @ [S', R, n_p]) already lies in y's layout, so the transposing
    copy goes (64 rows of one adapter, gate and up: 81 against 133 us; at 8 rows a slot the two forms
    are even, at 4 the transposed one wins by up to 1.4x)."""
    if y.is_cuda:
        return _triton().lora_expand(y, h, lora_bs, seg.token_slots)
    if not seg.slots:
        return y
    rank, dtype = lora_bs[0].shape[2], lora_bs[0].dtype
    if seg.use_grouped:
        hp = seg.pad(seg.gather(h).to(dtype))  # [S', G, P*R]
        slices = [hp[:, :, p * rank : (p + 1) * rank] for p in range(len(lora_bs))]  # [S', G, R] each
        if seg.group_len >= DIRECT_EXPAND_ROWS:
            deltas = [torch.bmm(hs, seg.group_weights(b).transpose(1, 2)) for hs, b in zip(slices, lora_bs)]
            delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=2)  # [S', G, sum n_p]
        else:
            deltas = [torch.bmm(seg.group_weights(b), hs.transpose(1, 2))
                      for hs, b in zip(slices, lora_bs)]  # per slice [S', n_p, G]
            delta = torch.cat([d.transpose(1, 2) for d in deltas], dim=2)  # [S', G, sum n_p]
        return seg.add(y, seg.unpad(delta).to(y.dtype))
    for s, seg_rows in zip(seg.slots, seg.rows):
        hs = h.index_select(0, seg_rows).to(dtype)  # [n_s, P*R]
        delta = torch.cat([hs[:, p * rank : (p + 1) * rank] @ b[s].T for p, b in enumerate(lora_bs)], dim=1)
        y.index_add_(0, seg_rows, delta.to(y.dtype))
    return y


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
    """Fast path of dora_scale_ref: grouped, each slot's gains read once (a view over a slot range)
    and broadcast over its tokens; per-token gathered gains otherwise."""
    if y.is_cuda:
        return _triton().dora_scale(y, gain, seg.token_slots)
    if not seg.slots:
        return y.clone()
    if seg.use_grouped:
        yp = seg.pad(seg.gather(y).float())  # [S', G, out]
        scaled = seg.unpad(yp * seg.group_weights(gain).float()[:, None]).to(y.dtype)  # [T', out]
        return seg.scatter(scaled, y)
    out = y.clone()
    rows = seg.active_rows
    scaled = y.index_select(0, rows).float() * gain.index_select(0, seg.active_slots).float()
    return out.index_copy_(0, rows, scaled.to(y.dtype))


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
    # float32 arithmetic, one rounding. y is cast to float32 first, then multiplied in place: a bf16 x float32
    # product casts element by element (64 x 960: 11.3 us against 4.1 us cast + 5.2 us multiply, one thread)
    if seg.use_grouped:  # each slot's tables read once and broadcast over its tokens
        yp = seg.pad(seg.gather(y)).to(torch.float32, copy=True)  # [S', G, out], never a view of y
        c1s, c2s = seg.group_weights(c1)[:, None], seg.group_weights(c2)[:, None]
        paired = _swap_halves(yp, group_size) if group_size else \
            torch.gather(yp, 2, seg.group_weights(partner)[:, None].expand_as(yp))
        rotated = seg.unpad(yp.mul_(c1s).addcmul_(paired, c2s)).to(y.dtype)  # [T', out]
        return seg.scatter(rotated, y)
    rows, slots = seg.active_rows, seg.active_slots
    every_row = rows.numel() == y.shape[0]
    ya = (y if every_row else y.index_select(0, rows)).to(torch.float32, copy=True)  # [T', out]
    c1s, c2s = c1.index_select(0, slots), c2.index_select(0, slots)  # [T', out] float32
    paired = _swap_halves(ya, group_size) if group_size else torch.gather(ya, 1, partner.index_select(0, slots))
    rotated = ya.mul_(c1s).addcmul_(paired, c2s).to(y.dtype)
    if every_row:
        return rotated
    return y.clone().index_copy_(0, rows, rotated)


def _swap_halves(y: torch.Tensor, g: int) -> torch.Tensor:
    """[..., out] -> the same with the two halves of every aligned group of g columns swapped: a roll by g/2
    within each group (2.5-3.5x faster than flip's indexed copy on the CPU)."""
    lead = y.shape[:-1]
    return y.reshape(*lead, -1, g).roll(g // 2, -1).reshape(*lead, y.shape[-1])


# ---------------------------------------------------------------- SHiRA sparse delta
class SparseBlocks:
    """Every slot's sparse matrix S_s [out, in] of one module in CSR blocks of one fixed capacity K, so the
    blocks of a slot range stack into one block-diagonal CSR matrix without moving values: one sparse
    matmul serves every slot of a step instead of one call per slot (each call costs tens of us on the CPU).

    crow [S, out + 1] int32: each block's row starts; its last row also holds the block's zero padding, so
    crow[s, out] = K. cols [S, K] int32 (padding: column in - 1, keeping rows sorted), vals [S, K] float32
    (padding 0). int32 indices: the CPU sparse matmul runs about a third faster on them than on int64.
    """

    def __init__(self, num_slots: int, out_features: int, in_features: int):
        self.out_features, self.in_features = out_features, in_features
        self.crow = torch.zeros(num_slots, out_features + 1, dtype=torch.int32)
        self.cols = torch.zeros(num_slots, 0, dtype=torch.int32)
        self.vals = torch.zeros(num_slots, 0)

    @property
    def capacity(self) -> int:
        return self.cols.shape[1]

    def load(self, slot: int, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        """Slot's matrix from (row, col, value) triplets (duplicates summed)."""
        shape = (self.out_features, self.in_features)
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]).long(), vals.float(), shape, check_invariants=True)
        csr = coo.coalesce().to_sparse_csr()
        nnz = csr.values().numel()
        if nnz > self.capacity:  # grow every block; old padding stays in each block's last row
            pad = nnz - self.capacity
            self.cols = torch.cat([self.cols, torch.full((self.cols.shape[0], pad), self.in_features - 1,
                                                         dtype=torch.int32)], 1)
            self.vals = torch.cat([self.vals, torch.zeros(self.vals.shape[0], pad)], 1)
            self.crow[:, -1] = self.capacity
        self.clear(slot)
        self.crow[slot] = csr.crow_indices().int()
        self.crow[slot, -1] = self.capacity
        self.cols[slot, :nnz] = csr.col_indices().int()
        self.vals[slot, :nnz] = csr.values()

    def clear(self, slot: int) -> None:
        self.crow[slot] = 0
        self.crow[slot, -1] = self.capacity
        self.cols[slot] = self.in_features - 1
        self.vals[slot] = 0.0

    def matrix(self, lo: int, hi: int) -> torch.Tensor:
        """Block-diagonal CSR [(hi - lo) * out, (hi - lo) * in] of slots lo..hi-1."""
        width, k = hi - lo, self.capacity
        if width == 1:
            return torch.sparse_csr_tensor(self.crow[lo], self.cols[lo], self.vals[lo],
                                           (self.out_features, self.in_features))
        block = torch.arange(width, dtype=torch.int32)[:, None]  # [W, 1]
        crow = torch.cat([(self.crow[lo:hi, :-1] + block * k).flatten(),
                          torch.tensor([width * k], dtype=torch.int32)])  # [W * out + 1]
        cols = (self.cols[lo:hi] + block * self.in_features).flatten()  # [W * K]
        return torch.sparse_csr_tensor(crow, cols, self.vals[lo:hi].flatten(),
                                       (width * self.out_features, width * self.in_features))


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
    x: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None, vals: torch.Tensor | None,
    out_features: int, seg: Segments, blocks: SparseBlocks | None = None,
) -> torch.Tensor:
    """Fast path of sparse_delta_ref; kept sparse. With `blocks` (the slots' matrices in CSR, built when a
    slot is loaded) a step's slots over a slot range take one block-diagonal sparse matmul, else one each;
    rows / cols / vals are then not read (None: the serving layers keep only the blocks on the CPU)."""
    if x.is_cuda:
        return _triton().sparse_delta(x, rows, cols, vals, out_features, seg.token_slots)
    if blocks is not None:
        if not seg.slots:
            return torch.zeros(x.shape[0], out_features, dtype=x.dtype)
        if seg.slot_range is not None and seg.use_grouped:
            (lo, hi), g = seg.slot_range, seg.group_len
            xp = seg.pad(seg.gather(x).float())  # [W, G, in]
            y = blocks.matrix(lo, hi) @ xp.transpose(1, 2).reshape(-1, g)  # [W * out, G]
            y = y.view(hi - lo, out_features, g).transpose(1, 2)  # [W, G, out]
            return seg.scatter(seg.unpad(y).to(x.dtype), None)
        xt = x.float().T.contiguous()  # [in, T]; the sparse matmul is about twice as fast on contiguous columns
        out_t = torch.zeros(out_features, x.shape[0], dtype=torch.float32)  # [out, T]
        for s, tok in zip(seg.slots, seg.rows):
            out_t.index_copy_(1, tok, blocks.matrix(s, s + 1) @ xt.index_select(1, tok))
        return out_t.T.to(x.dtype)
    out = torch.zeros(x.shape[0], out_features, dtype=torch.float32)
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


def lora_update_norms(h: torch.Tensor, grams: torch.Tensor, token_slots: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: n[t] = ||s B[slot_t] h[t]|| = sqrt(h[t]^T G[slot_t] h[t]), G = s^2 B^T B (rank x rank),
    0 for tokens without a slot. The norm of a LoRA update without expanding it (TS-PEFT's gate).

    h [T, R] float32 (A x), grams [S, R, R] float32, token_slots [T] -> [T] float32; without token_slots,
    grams is one [R, R] matrix for every token (a training job's module).
    """
    g = grams if token_slots is None else grams.index_select(0, token_slots.clamp_min(0))  # [R, R] | [T, R, R]
    norms = (torch.matmul(h[:, None, :], g)[:, 0] * h).sum(1).clamp_min(0).sqrt()  # [T]
    return norms if token_slots is None else torch.where(token_slots >= 0, norms, 0.0)


def gate_updates(base: torch.Tensor, adapted: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Semantics: row t is adapted[t] when ||adapted[t] - base[t]|| / ||base[t]|| >= tau[t], else base[t].

    base, adapted [T, out] (the projection's output without / with the adapter), tau [T] float32 (0 keeps
    every row) -> [T, out] in adapted's dtype."""
    keep = update_ratio(adapted - base, base) >= tau
    return torch.where(keep[:, None], adapted, base)
