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
    Segments,
    dora_scale,
    gate_updates,
    lora_expand,
    lora_shrink,
    road_rotate,
    sparse_csr,
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
                 max_rank: int, ctx: AdapterContext, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.dtype = dtype  # LoRA buffers hold the model's compute dtype (the ops compute in float32)
        self.parts = parts
        self.offsets = dict(zip(parts, [sum(part_sizes[:i]) for i in range(len(parts))]))
        self.sizes = dict(zip(parts, part_sizes))
        self.in_features = base.in_features
        self.num_slots, self.max_rank, self.ctx = num_slots, max_rank, ctx
        # LoRA: A of every part stacked along the rank axis, so one shrink serves all parts of the module,
        # and one scaled B^T per part (s * B^T, [S, R, n_part]), so one expand call adds every part's slice.
        # Both appear for all parts when any part gets a LoRA (zero for parts an adapter leaves alone).
        self.lora_a: torch.Tensor | None = None  # [S, parts * R, in]
        self.lora_bts: tuple[torch.Tensor, ...] = ()  # per part [S, R, n_part]
        self.dora: dict[str, torch.Tensor] = {}  # gain [S, out]
        # RoAd over the whole packed output (identity on columns a slot does not rotate): c1, c2 [S, out_total]
        # float32, partner [S, out_total] int64, and each slot's group size g when its pairing is j +- g/2 in
        # groups aligned to every part (-1: mixed or unaligned, rotate by gather; None: nothing loaded).
        self.road: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.road_group: list[int | None] = [None] * num_slots
        self.shira: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # rows, cols, vals [S, K]
        self.shira_csr: dict[str, list[torch.Tensor | None]] = {}  # per slot [out, in] CSR (CPU fast path)
        self.gates: dict[str, torch.Tensor] = {}  # TS-PEFT: part -> tau [S] float32 (0: every token updated)

    # ---- slot management (engine thread, between steps) ----
    def clear_slot(self, slot: int) -> None:
        if self.lora_a is not None:
            self.lora_a[slot].zero_()
        for bt in self.lora_bts:
            bt[slot].zero_()
        for gain in self.dora.values():
            gain[slot] = 1.0
        if self.road is not None:
            c1, c2, partner = self.road
            c1[slot], c2[slot] = 1.0, 0.0
            partner[slot] = torch.arange(partner.shape[1])
            self.road_group[slot] = None
        for _, _, vals in self.shira.values():
            vals[slot] = 0.0
        for per_slot in self.shira_csr.values():
            per_slot[slot] = None
        for tau in self.gates.values():
            tau[slot] = 0.0

    def load_slot(self, slot: int, part: str, delta: ModuleDelta) -> None:
        n, s = self.sizes[part], self.num_slots
        if delta.gate_tau is not None:
            self.gates.setdefault(part, torch.zeros(s))[slot] = delta.gate_tau
        if delta.lora_a is not None:
            if self.lora_a is None:
                self.lora_a = torch.zeros(s, len(self.parts) * self.max_rank, self.in_features, dtype=self.dtype)
                self.lora_bts = tuple(torch.zeros(s, self.max_rank, self.sizes[p], dtype=self.dtype)
                                      for p in self.parts)
            bt = self.lora_bts[self.parts.index(part)]
            r, lo = delta.rank, self.parts.index(part) * self.max_rank
            self.lora_a[slot, lo : lo + self.max_rank] = 0.0
            self.lora_a[slot, lo : lo + r] = delta.lora_a
            bt[slot].zero_()
            bt[slot, :r] = delta.lora_b.T * delta.lora_scale
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
        if delta.shira_vals is not None:
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
            self.shira_csr.setdefault(part, [None] * s)[slot] = sparse_csr(
                delta.shira_rows, delta.shira_cols, delta.shira_vals, (n, self.in_features))

    # ---- forward ----
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, in] -> [T, sum(part sizes)]
        y = self.base(x)
        segs = self.ctx.segments
        if not segs:
            return y
        bias = getattr(self.base, "bias", None)
        lora_seg, dora_seg, road_seg = segs.get("lora"), segs.get("dora"), segs.get("road")
        base_all = y.clone() if self.gates else None  # TS-PEFT gates compare against the base output
        if self.road is not None and road_seg is not None:  # one rotation over every part's columns
            groups = {self.road_group[slot] for slot in road_seg.slots} - {None}
            g = groups.pop() if len(groups) == 1 and -1 not in groups else 0
            y = road_rotate(y, *self.road, road_seg, g)
        if self.lora_a is not None and lora_seg is not None:  # + s B A x, every part's slice at once
            lora_expand(y, lora_shrink(x, self.lora_a, lora_seg), self.lora_bts, lora_seg)  # h [T, P*R]
        for part in self.parts:
            lo, n = self.offsets[part], self.sizes[part]
            ys = y[:, lo : lo + n]
            gate = self.gates.get(part)
            if part in self.dora and dora_seg is not None:  # DoRA rows: g * (W0 x + s B A x) + bias
                b_part = bias[lo : lo + n] if bias is not None else 0
                scaled = dora_scale(ys - b_part, self.dora[part], dora_seg) + b_part
                rows = dora_seg.active_rows
                ys.index_copy_(0, rows, scaled.index_select(0, rows))
            if part in self.shira and segs.get("shira") is not None:
                rows, cols, vals = self.shira[part]
                ys.add_(sparse_delta(x, rows, cols, vals, n, segs["shira"], self.shira_csr.get(part)))
            if gate is not None:
                slots = self.ctx.token_slots  # [T]
                tau = torch.where(slots >= 0, gate[slots.clamp_min(0)], 0.0)  # [T]
                ys.copy_(gate_updates(base_all[:, lo : lo + n], ys, tau))
        return y


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
                                    dtype)
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
