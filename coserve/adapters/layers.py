"""Device tier: per-module slot buffers and the wrapper that applies every slot's adapter in one pass.

`attach_adapter_layers` wraps the model's projections (a pass, like quantization). Each wrapper
holds, per adapted part (q/k/v inside the packed qkv_proj, gate/up inside gate_up_proj, o, down),
the weights of every slot stacked along dim 0: LoRA A/B padded to the slot rank, DoRA gains,
RoAd tables, SHiRA index/value lists. Buffers appear the first time an adapter needs them and
unused slots hold neutral values (zero deltas, unit gains, identity rotations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from coserve.adapters.lora import dora_gain
from coserve.adapters.types import BaseModelShape, LoadedAdapter, ModuleDelta
from coserve.kernels.adapter_ops import (
    GATE_EPS,
    Segments,
    SparseBlocks,
    dora_scale,
    gate_updates,
    lora_expand,
    lora_shrink,
    lora_update_norms,
    road_rotate,
    sparse_delta,
)

PACKED_PARTS = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}


@dataclass
class AdapterContext:
    """The current step's tokens grouped by slot, per kind of adapter; set by the runner around a forward."""

    segments: dict[str, Segments] = field(default_factory=dict)
    token_slots: torch.Tensor | None = None  # [T] every token's slot (-1: none); for TS-PEFT gates


def base_weight(linear: nn.Module) -> torch.Tensor:
    """The served base weight [out, in] in float32 (dequantized if the base is quantized)."""
    if hasattr(linear, "dequantized_weight"):
        return linear.dequantized_weight()
    return linear.weight.detach().float()


class AdapterLinear(nn.Module):
    def __init__(self, base: nn.Module, parts: tuple[str, ...], part_sizes: list[int], num_slots: int,
                 max_rank: int, ctx: AdapterContext, dtype: torch.dtype = torch.float32, on_cuda: bool = False):
        super().__init__()
        self.base = base
        self.dtype = dtype  # LoRA buffers hold the compute dtype (see adapter_ops: which dtype the ops multiply in)
        self.parts = parts
        self.offsets = dict(zip(parts, [sum(part_sizes[:i]) for i in range(len(parts))]))
        self.sizes = dict(zip(parts, part_sizes))
        self.in_features = base.in_features
        self.num_slots, self.max_rank, self.ctx = num_slots, max_rank, ctx
        # LoRA: A of every part stacked along the rank axis, so one shrink serves all parts of the module,
        # and one scaled B per part (s * B, [S, n_part, R], PEFT's layout), so one expand call adds every part's slice.
        # Both appear for all parts when any part gets a LoRA (zero for parts an adapter leaves alone).
        self.lora_a: torch.Tensor | None = None  # [S, parts * R, in]
        self.lora_bs: tuple[torch.Tensor, ...] = ()  # per part [S, n_part, R]
        self.lora_grams: tuple[torch.Tensor, ...] = ()  # TS-PEFT LoRA: per part s^2 B^T B [S, R, R] float32
        self.dora: dict[str, torch.Tensor] = {}  # gain [S, out]
        # RoAd over the whole packed output (identity on columns a slot does not rotate): c1, c2 [S, out_total]
        # float32, partner [S, out_total] int64, and each slot's group size g when its pairing is j +- g/2 in
        # groups aligned to every part (-1: mixed or unaligned, rotate by gather; None: nothing loaded).
        self.road: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.road_group: list[int | None] = [None] * num_slots
        # SHiRA: every slot's matrix in CSR blocks on the CPU (8 bytes an entry); the Triton kernel's
        # (rows, cols, vals) [S, K] lists (20 bytes an entry) only on CUDA. Holding both on the CPU took
        # 14.3 GB of RSS at 64 slots with 32 rank-16 all-projection adapters (7.0 GB with the blocks only)
        self.on_cuda = on_cuda
        self.shira: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # rows, cols, vals [S, K]
        self.shira_blocks: dict[str, SparseBlocks] = {}
        self.gates: dict[str, torch.Tensor] = {}  # TS-PEFT: part -> tau [S] float32 (0: every token updated)

    # ---- slot management (engine thread, between steps) ----
    def clear_slot(self, slot: int) -> None:
        if self.lora_a is not None:
            self.lora_a[slot].zero_()
        for buffer in self.lora_bs + self.lora_grams:
            buffer[slot].zero_()
        for gain in self.dora.values():
            gain[slot] = 1.0
        if self.road is not None:
            c1, c2, partner = self.road
            c1[slot], c2[slot] = 1.0, 0.0
            partner[slot] = torch.arange(partner.shape[1])
            self.road_group[slot] = None
        for _, _, vals in self.shira.values():
            vals[slot] = 0.0
        for blocks in self.shira_blocks.values():
            blocks.clear(slot)
        for tau in self.gates.values():
            tau[slot] = 0.0

    def load_slot(self, slot: int, part: str, delta: ModuleDelta) -> None:
        n, s = self.sizes[part], self.num_slots
        if delta.gate_tau is not None:
            self.gates.setdefault(part, torch.zeros(s))[slot] = delta.gate_tau
        if delta.lora_a is not None:
            if self.lora_a is None:
                self.lora_a = torch.zeros(s, len(self.parts) * self.max_rank, self.in_features, dtype=self.dtype)
                self.lora_bs = tuple(torch.zeros(s, self.sizes[p], self.max_rank, dtype=self.dtype)
                                     for p in self.parts)
            b = self.lora_bs[self.parts.index(part)]
            r, lo = delta.rank, self.parts.index(part) * self.max_rank
            self.lora_a[slot, lo : lo + self.max_rank] = 0.0
            self.lora_a[slot, lo : lo + r] = delta.lora_a
            b[slot].zero_()
            b[slot, :, :r] = delta.lora_b * delta.lora_scale
            if delta.gate_tau is not None:  # the gate reads update norms off the Gram matrix of s B
                if not self.lora_grams:
                    self.lora_grams = tuple(torch.zeros(s, self.max_rank, self.max_rank) for _ in self.parts)
                scaled_b = b[slot].float()  # [n, R]
                self.lora_grams[self.parts.index(part)][slot] = scaled_b.T @ scaled_b
        if delta.dora_magnitude is not None:
            if part not in self.dora:
                self.dora[part] = torch.ones(s, n)
            weight = base_weight(self.base)[self.offsets[part] : self.offsets[part] + n]  # served base rows
            self.dora[part][slot] = dora_gain(delta, weight)
        if delta.road_c1 is not None:
            total, lo = sum(self.sizes.values()), self.offsets[part]
            if self.road is None:
                self.road = (torch.ones(s, total), torch.zeros(s, total), torch.arange(total).repeat(s, 1))
            c1, c2, partner = self.road
            c1[slot, lo : lo + n], c2[slot, lo : lo + n] = delta.road_c1, delta.road_c2
            partner[slot, lo : lo + n] = delta.road_partner + lo
            g = 2 * int(delta.road_partner[0])
            aligned = all(size % g == 0 for size in self.sizes.values())
            self.road_group[slot] = g if aligned and self.road_group[slot] in (None, g) else -1
        if delta.shira_vals is not None and not self.on_cuda:
            if part not in self.shira_blocks:
                self.shira_blocks[part] = SparseBlocks(s, n, self.in_features)
            self.shira_blocks[part].load(slot, delta.shira_rows, delta.shira_cols, delta.shira_vals)
        elif delta.shira_vals is not None:
            k = delta.shira_vals.numel()
            rows, cols, vals = self.shira.get(part, (torch.zeros(s, 0, dtype=torch.long),) * 2 + (torch.zeros(s, 0),))
            if k > rows.shape[1]:  # grow the padded index lists
                pad = k - rows.shape[1]
                rows = torch.cat([rows, torch.zeros(s, pad, dtype=torch.long)], 1)
                cols = torch.cat([cols, torch.zeros(s, pad, dtype=torch.long)], 1)
                vals = torch.cat([vals, torch.zeros(s, pad)], 1)
            vals[slot] = 0.0
            rows[slot, :k], cols[slot, :k], vals[slot, :k] = delta.shira_rows, delta.shira_cols, delta.shira_vals
            self.shira[part] = (rows, cols, vals)

    # ---- forward ----
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, in] -> [T, sum(part sizes)]
        y = self.base(x)
        segs = self.ctx.segments
        if not segs:
            return y
        bias = getattr(self.base, "bias", None)
        lora_seg, dora_seg, road_seg = segs.get("lora"), segs.get("dora"), segs.get("road")
        # TS-PEFT: LoRA tokens are gated before their expand (pregated); other methods' after the update,
        # against the base output
        pregated = None
        if self.lora_grams and lora_seg is not None:
            pregated = lora_seg.token_slots >= 0
            if dora_seg is not None:  # DoRA's update includes its magnitude: gated after
                pregated &= dora_seg.token_slots < 0
        gated_after = bool(self.gates) and (pregated is None or bool((~pregated & (self.ctx.token_slots >= 0)).any()))
        base_all = y.clone() if gated_after else None
        if self.road is not None and road_seg is not None:  # one rotation over every part's columns
            groups = {self.road_group[slot] for slot in road_seg.slots} - {None}
            g = groups.pop() if len(groups) == 1 and -1 not in groups else 0
            y = road_rotate(y, *self.road, road_seg, g)
        if self.lora_a is not None and lora_seg is not None:  # + s B A x, every part's slice at once
            h = lora_shrink(x, self.lora_a, lora_seg)  # [T, P*R] float32
            if pregated is not None:
                self._gate_lora_rows(h, y, lora_seg.token_slots, pregated)
            lora_expand(y, h, self.lora_bs, lora_seg)
        for part in self.parts:
            lo, n = self.offsets[part], self.sizes[part]
            ys = y[:, lo : lo + n]
            gate = self.gates.get(part)
            if part in self.dora and dora_seg is not None:  # DoRA rows: g * (W0 x + s B A x) + bias
                if bias is None:  # other rows come back unchanged
                    ys.copy_(dora_scale(ys, self.dora[part], dora_seg))
                else:  # (y - b) + b need not round back to y: copy the DoRA rows only
                    b_part = bias[lo : lo + n]
                    scaled = dora_scale(ys - b_part, self.dora[part], dora_seg) + b_part
                    rows = dora_seg.active_rows
                    ys.index_copy_(0, rows, scaled.index_select(0, rows))
            if (part in self.shira or part in self.shira_blocks) and segs.get("shira") is not None:
                rows, cols, vals = self.shira.get(part, (None, None, None))
                ys.add_(sparse_delta(x, rows, cols, vals, n, segs["shira"], self.shira_blocks.get(part)))
            if gate is not None and gated_after:
                slots = self.ctx.token_slots  # [T]
                tau = torch.where(slots >= 0, gate[slots.clamp_min(0)], 0.0)  # [T]
                if pregated is not None:
                    tau = tau.masked_fill(pregated, 0.0)
                ys.copy_(gate_updates(base_all[:, lo : lo + n], ys, tau))
        return y

    def _gate_lora_rows(self, h: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, pregated: torch.Tensor) -> None:
        """TS-PEFT for LoRA tokens as training gates them: r = ||s B A x|| / ||W0 x||, the update norm read
        off the rank-R Gram matrix, and a gated-out token's h row zeroed, so its expand adds nothing.
        h [T, P*R] float32 (in place), y [T, out] the base output, slots [T] LoRA slots, pregated [T] bool."""
        for i, part in enumerate(self.parts):
            tau_of_slot = self.gates.get(part)
            if tau_of_slot is None:
                continue
            lo, n, r = self.offsets[part], self.sizes[part], self.max_rank
            hp = h[:, i * r : (i + 1) * r]  # [T, R]
            base_norm = y[:, lo : lo + n].float().norm(dim=1)  # [T]
            ratio = lora_update_norms(hp, self.lora_grams[i], slots) / (base_norm + GATE_EPS)
            tau = torch.where(pregated, tau_of_slot[slots.clamp_min(0)], 0.0)  # [T]
            hp.mul_((ratio >= tau)[:, None])


def attach_adapter_layers(
    model: nn.Module, shape: BaseModelShape, num_slots: int, max_rank: int
) -> tuple[AdapterContext, dict]:
    """Wrap every adapted projection; returns the shared context and {(layer, packed name): wrapper}."""
    ctx = AdapterContext()
    dtype = model.model.embed_tokens.weight.dtype  # the compute dtype
    wrappers: dict[tuple[int, str], AdapterLinear] = {}
    sizes = {name: out_features for name, (out_features, _) in shape.module_shapes.items()}
    for i, layer in enumerate(model.model.layers):
        for packed, parts in PACKED_PARTS.items():
            owner_name, attr = packed.split(".")
            owner = getattr(layer, owner_name)
            wrapper = AdapterLinear(getattr(owner, attr), parts, [sizes[p] for p in parts], num_slots, max_rank, ctx,
                                    dtype, model.model.embed_tokens.weight.is_cuda)
            setattr(owner, attr, wrapper)
            wrappers[i, packed] = wrapper
    return ctx, wrappers


def part_owner(module: str) -> str:
    return next(packed for packed, parts in PACKED_PARTS.items() if module in parts)


def load_adapter_into_slot(wrappers: dict, slot: int, adapter: LoadedAdapter) -> None:
    for wrapper in wrappers.values():
        wrapper.clear_slot(slot)
    for (layer, module), delta in adapter.modules.items():
        wrappers[layer, part_owner(module)].load_slot(slot, module, delta)
