"""Inputs for the adapter-op tests: ranks, mixed ranks, adapter popularity, odd token counts, dtypes."""

from __future__ import annotations

import torch

RANKS = [1, 8, 16, 64, "mixed"]
POPULARITY = ["distinct", "uniform", "zipf", "identical"]
# the runner's layout: tokens ordered by slot, equal groups, base-model tokens last (the ops read rows in place)
ORDERED = "slot-ordered"
TOKENS = [1, 7, 33]
DTYPES = [torch.float32, torch.bfloat16]
SLOTS, IN, OUT, NNZ = 6, 48, 40, 37
SLICES = [24, 16]  # output slices of the packed LoRA case (sum = OUT)


def token_slots(popularity: str, t: int, gen: torch.Generator) -> torch.Tensor:
    if popularity == "distinct":  # every token its own slot, some on the base model (-1)
        return torch.tensor([(i % (SLOTS + 1)) - 1 for i in range(t)])
    if popularity == "uniform":
        return torch.randint(-1, SLOTS, (t,), generator=gen)
    if popularity == "zipf":
        weights = torch.tensor([1.0 / (k + 1) ** 1.5 for k in range(SLOTS + 1)])
        return torch.multinomial(weights, t, replacement=True, generator=gen) - 1
    if popularity == ORDERED:
        per_slot = max(1, t // SLOTS)
        grouped = [s for s in range(SLOTS) for _ in range(per_slot)][:t]
        return torch.tensor(grouped + [-1] * (t - len(grouped)))
    return torch.full((t,), 2)


def make_case(rank, popularity: str, t: int, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    max_rank = 64 if rank == "mixed" else rank
    ranks = [1 + (7 * s) % 64 for s in range(SLOTS)] if rank == "mixed" else [rank] * SLOTS
    a = torch.randn(SLOTS, max_rank, IN, generator=gen)
    b = torch.randn(SLOTS, OUT, max_rank, generator=gen)
    for s, r in enumerate(ranks):  # rank-padded with zeros, as the slot buffers are
        a[s, r:] = 0
        b[s, :, r:] = 0
    scale = torch.rand(SLOTS, generator=gen) + 0.5
    scaled_b = b * scale[:, None, None]  # [S, out, R], B with the LoRA scale folded in
    g = 8
    j = torch.arange(OUT)
    first = (j % g) < g // 2
    partner = torch.where(first, j + g // 2, j - g // 2).repeat(SLOTS, 1)
    return {
        "x": torch.randn(t, IN, generator=gen).to(dtype),
        "y": torch.randn(t, OUT, generator=gen).to(dtype),
        # a packed projection of two parts: A of both stacked on the rank axis, one scaled B per output slice
        "a": torch.cat([a, 0.5 * a], dim=1).to(dtype),  # [S, 2R, in]
        "bs": tuple(part.contiguous().to(dtype) for part in scaled_b.split(SLICES, dim=1)),  # [S, n_p, R]
        "gain": torch.rand(SLOTS, OUT, generator=gen) + 0.5,
        "c1": torch.randn(SLOTS, OUT, generator=gen), "c2": torch.randn(SLOTS, OUT, generator=gen),
        "partner": partner,
        "group_size": g,
        "rows": torch.randint(0, OUT, (SLOTS, NNZ), generator=gen),
        "cols": torch.randint(0, IN, (SLOTS, NNZ), generator=gen),
        "vals": torch.randn(SLOTS, NNZ, generator=gen),
        "slots": token_slots(popularity, t, gen),
    }


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 3e-2


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    scale = max(1.0, b.float().abs().max().item())
    return (a.float() - b.float()).abs().max().item() <= tolerance(dtype) * scale
