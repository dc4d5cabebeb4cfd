"""The engine's adapter residency: host cache + device slots + the per-step token grouping.

Implements the scheduler's AdapterGate. Runs on the engine thread only (adapters registered
before the loop starts, or through AsyncEngine commands afterwards).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from coserve.adapters.layers import AdapterContext, attach_adapter_layers, load_adapter_into_slot
from coserve.adapters.peft_format import load_adapter_dir
from coserve.adapters.registry import HostCache, LoadTiming, SlotTable
from coserve.adapters.types import BaseModelShape, LoadedAdapter
from coserve.engine.model import CausalLM
from coserve.kernels.adapter_ops import Segments
from coserve.scheduler.outputs import ScheduledSequence

KINDS_OF_METHOD = {"LORA": ("lora",), "DORA": ("lora", "dora"), "ROAD": ("road",), "SHIRA": ("shira",)}


def base_shape(model: CausalLM) -> BaseModelShape:
    c = model.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return BaseModelShape(c.num_hidden_layers, {
        "q_proj": (q, c.hidden_size), "k_proj": (kv, c.hidden_size), "v_proj": (kv, c.hidden_size),
        "o_proj": (c.hidden_size, q), "gate_proj": (c.intermediate_size, c.hidden_size),
        "up_proj": (c.intermediate_size, c.hidden_size), "down_proj": (c.hidden_size, c.intermediate_size),
    })


class AdapterRuntime:
    def __init__(self, model: CausalLM, max_loras: int, max_cpu_loras: int, max_rank: int, on_timing=None):
        self.model = model
        self.shape = base_shape(model)
        self.max_rank = max_rank
        self.host = HostCache(max_cpu_loras, on_timing)
        self.slots = SlotTable(max_loras)
        self.on_timing = on_timing
        self.ctx: AdapterContext | None = None
        self.wrappers: dict = {}
        self.slot_method: dict[int, str] = {}

    # ---- registration ----
    def register_dir(self, name: str, path: str | Path, preload: bool = True) -> LoadedAdapter | None:
        """Register a PEFT directory; with preload it is validated now (errors surface at once)."""
        source = lambda: load_adapter_dir(name, path, self.shape, self.max_rank)  # noqa: E731
        adapter = source() if preload else None
        self.register(name, source, adapter)
        return adapter

    def register(self, name: str, source, adapter: LoadedAdapter | None = None) -> None:
        """Make `name` servable from `source`. Replacing a name needs it idle (stored adapters never replace:
        each revision has its own name, so running requests finish on the revision they started with)."""
        if self.ctx is None:  # first adapter: wrap the projections (a pass over the model)
            self.ctx, self.wrappers = attach_adapter_layers(self.model, self.shape, self.slots.num_slots,
                                                            self.max_rank)
        self.slots.evict(name)
        self.host.register(name, source, adapter)

    def forget(self, name: str) -> None:
        """Drop an idle adapter from the device slots and the host cache."""
        self.slots.evict(name)
        self.slots.pinned.discard(name)
        self.host.forget(name)

    def pin(self, name: str) -> None:
        """Keep `name` in its device slot once loaded, even when idle."""
        self.slots.pinned.add(name)

    def unpin(self, name: str) -> None:
        self.slots.pinned.discard(name)

    def known(self, name: str) -> bool:
        return self.host.known(name)

    def names(self) -> list[str]:
        return self.host.names()

    # ---- AdapterGate ----
    def can_admit(self, adapter_id: str) -> bool:
        return self.host.ready(adapter_id) and self.slots.has_room_for(adapter_id)

    def on_admit(self, adapter_id: str) -> None:
        slot, fresh = self.slots.acquire(adapter_id)
        if fresh:
            start = time.perf_counter()
            adapter = self.host.get(adapter_id)
            load_adapter_into_slot(self.wrappers, slot, adapter)
            self.slot_method[slot] = adapter.method
            if self.on_timing:
                self.on_timing(LoadTiming(adapter_id, "device", time.perf_counter() - start))

    def on_release(self, adapter_id: str) -> None:
        self.slots.release(adapter_id)

    # ---- per step ----
    def order_by_slot(self, rows: list[ScheduledSequence]) -> list[ScheduledSequence]:
        """Fill in each row's adapter slot and return the rows ordered by it (stable; base-model rows
        last), so that each slot's tokens are contiguous and the adapter ops read them in place."""
        for row in rows:
            row.adapter_slot = self.slots.slot_of.get(row.adapter_id, -1) if row.adapter_id else -1
        return sorted(rows, key=lambda row: row.adapter_slot if row.adapter_slot >= 0 else self.slots.num_slots)

    def begin_step(self, rows: list[ScheduledSequence], extra_rows: int = 0) -> None:
        """Group this step's tokens by slot and kind for the wrapped projections (rows carry their slots,
        see order_by_slot); `extra_rows` base-only rows follow them (fine-tuning rows: their adapter is
        applied by the trainer)."""
        if self.ctx is None:
            return
        slots_per_row = [row.adapter_slot for row in rows]
        if all(s < 0 for s in slots_per_row):
            self.ctx.segments, self.ctx.token_slots = {}, None
            return
        token_slots = torch.tensor([s for row, s in zip(rows, slots_per_row) for _ in row.token_ids]
                                   + [-1] * extra_rows)  # [T]
        self.ctx.token_slots = token_slots
        segments = {}
        for kind in ("lora", "dora", "road", "shira"):
            of_kind = [s for s, m in self.slot_method.items() if kind in KINDS_OF_METHOD[m]]
            if not of_kind:
                continue
            mask = torch.isin(token_slots, torch.tensor(of_kind))
            if mask.any():
                segments[kind] = Segments.build(torch.where(mask, token_slots, -1))
        self.ctx.segments = segments

    def end_step(self) -> None:
        if self.ctx is not None:
            self.ctx.segments, self.ctx.token_slots = {}, None

    def take_failures(self, adapter_ids: set[str]) -> dict[str, str]:
        """Load failures of these adapters, cleared so that a later request tries again."""
        return {a: self.host.failed.pop(a) for a in adapter_ids if a in self.host.failed}
