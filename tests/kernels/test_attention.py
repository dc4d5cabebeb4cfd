"""Paged attention: the fast path against the reference, over dtypes, GQA groups and odd sizes."""

from __future__ import annotations

import pytest
import torch

from coserve.kernels.attention import AttentionMetadata, paged_attention, paged_attention_ref, write_kv


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,block_size", [(4, 4, 16), (6, 2, 4), (9, 3, 5)])
@pytest.mark.parametrize("starts,qlens", [
    ([0, 11, 30, 7, 0], [13, 6, 1, 1, 1]),  # fresh prompt, continued prompt, batched decodes
    ([21], [1]),  # a lone decode (its own fast path)
    ([0, 40], [9, 1]),  # one decode beside a prompt
])
@pytest.mark.parametrize("consecutive", [False, True])  # blocks handed out in order: a lone decode reads a view
def test_paged_attention_matches_reference(dtype, tol, heads, kv_heads, block_size, starts, qlens, consecutive):
    gen = torch.Generator().manual_seed(0)
    d, num_blocks = 16, 64
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(num_blocks))[::-1] if consecutive else torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for s, q in zip(starts, qlens):
        n = -(-(s + q) // block_size)
        tables.append([free.pop() for _ in range(n)])
    # Fill the cached prefixes with random K/V first.
    for s, table in zip(starts, tables):
        if s:
            pre = AttentionMetadata.build([s], [0], [table], block_size)
            write_kv(k_cache, v_cache, torch.randn(s, kv_heads, d, generator=gen).to(dtype),
                     torch.randn(s, kv_heads, d, generator=gen).to(dtype), pre.slot_mapping)
    meta = AttentionMetadata.build(qlens, starts, tables, block_size)
    if qlens.count(1) == 1:
        assert isinstance(meta.lone_decode_context, slice) == consecutive
    t = sum(qlens)
    k_new = torch.randn(t, kv_heads, d, generator=gen).to(dtype)
    v_new = torch.randn(t, kv_heads, d, generator=gen).to(dtype)
    write_kv(k_cache, v_cache, k_new, v_new, meta.slot_mapping)
    q = torch.randn(t, heads, d, generator=gen).to(dtype)
    ref = paged_attention_ref(q, k_cache, v_cache, meta, d**-0.5)
    fast = paged_attention(q, k_cache, v_cache, meta, d**-0.5)
    assert fast.shape == (t, heads, d)
    assert (fast.float() - ref.float()).abs().max().item() <= tol


def test_metadata_slots_follow_block_tables():
    meta = AttentionMetadata.build([3, 1], [0, 5], [[7], [2, 9]], 4)
    assert meta.slot_mapping.tolist() == [28, 29, 30, 9 * 4 + 1]
    assert meta.context_lens == [3, 6]
    assert meta.decode_rows.tolist() == [3]
