"""Batched adapter ops: the CPU fast paths and the Triton kernels (TRITON_INTERPRET=1) against the
pure-torch references, over ranks, mixed ranks, adapter popularity, odd token counts and dtypes."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coserve.kernels import adapter_ops as ops
from tests.kernels.adapter_cases import DTYPES, NNZ, ORDERED, POPULARITY, RANKS, TOKENS, close, make_case

MATRIX = list(itertools.product(RANKS, POPULARITY + [ORDERED], TOKENS, DTYPES))


@pytest.mark.parametrize("rank,popularity,t,dtype", MATRIX)
def test_cpu_fast_paths_match_references(rank, popularity, t, dtype):
    c = make_case(rank, popularity, t, dtype)
    seg = ops.Segments.build(c["slots"])
    h_ref = ops.lora_shrink_ref(c["x"], c["a"], c["slots"])
    h = ops.lora_shrink(c["x"], c["a"], seg)
    assert close(h, h_ref, dtype)
    expand_ref = ops.lora_expand_ref(c["y"], h_ref, c["bs"], c["slots"])
    y = c["y"].clone()
    assert ops.lora_expand(y, h_ref, c["bs"], seg) is y and close(y, expand_ref, dtype)  # in place
    assert close(ops.dora_scale(c["y"], c["gain"], seg), ops.dora_scale_ref(c["y"], c["gain"], c["slots"]), dtype)
    road_ref = ops.road_rotate_ref(c["y"], c["c1"], c["c2"], c["partner"], c["slots"])
    assert close(ops.road_rotate(c["y"], c["c1"], c["c2"], c["partner"], seg), road_ref, dtype)
    assert close(ops.road_rotate(c["y"], c["c1"], c["c2"], c["partner"], seg, c["group_size"]), road_ref, dtype)
    sparse_ref = ops.sparse_delta_ref(c["x"], c["rows"], c["cols"], c["vals"], 40, c["slots"])
    assert close(ops.sparse_delta(c["x"], c["rows"], c["cols"], c["vals"], 40, seg), sparse_ref, dtype)
    blocks = ops.SparseBlocks(c["rows"].shape[0], 40, 48)
    for s in range(c["rows"].shape[0]):  # mixed nnz per slot: the blocks grow and pad
        k = NNZ - 5 * (s % 3)
        blocks.load(s, c["rows"][s, :k], c["cols"][s, :k], c["vals"][s, :k])
    vals = c["vals"].clone()
    for s in range(vals.shape[0]):
        vals[s, NNZ - 5 * (s % 3):] = 0  # the same matrices as triplet lists
    sparse_ref = ops.sparse_delta_ref(c["x"], c["rows"], c["cols"], vals, 40, c["slots"])
    assert close(ops.sparse_delta(c["x"], c["rows"], c["cols"], vals, 40, seg, blocks), sparse_ref, dtype)


@pytest.mark.parametrize("popularity", POPULARITY)
def test_lora_update_norms_equal_the_norms_of_the_expanded_updates(popularity):
    import torch

    c = make_case(16, popularity, 33, torch.float32)
    b = c["bs"][0]  # [S, n, R]: s B of the first slice
    h = ops.lora_shrink_ref(c["x"], c["a"], c["slots"])[:, :16]  # [T, R]
    update = ops.lora_expand_ref(torch.zeros(33, b.shape[1]), h, (b,), c["slots"])  # [T, n]
    norms = ops.lora_update_norms(h, b.transpose(1, 2) @ b, c["slots"])
    torch.testing.assert_close(norms, update.norm(dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [[2] * 9, [0, 0, 1, 1, 2, 2, 3, 3, 3], [3, 1, -1, 0, 2, 2, 1, 0, 3]])
def test_dora_scale_on_a_column_slice_of_a_packed_output(slots):
    """The serving layer scales each part's columns of the packed output in place: a strided view."""
    import torch

    y = torch.randn(9, 30)[:, 5:25]  # [T, out] non-contiguous
    gain = torch.rand(4, 20) + 0.5
    token_slots = torch.tensor(slots)
    expected = ops.dora_scale_ref(y, gain, token_slots)
    torch.testing.assert_close(ops.dora_scale(y, gain, ops.Segments.build(token_slots)), expected)


def test_segments_group_tokens_by_slot():
    import torch

    seg = ops.Segments.build(torch.tensor([2, -1, 0, 2, 2, 0]))
    assert seg.slots == [0, 2] and seg.group_len == 3 and seg.use_grouped
    assert seg.sorted_rows.tolist() == [2, 5, 0, 3, 4]
    values = torch.arange(5.0)[:, None]
    assert torch.equal(seg.unpad(seg.pad(values)), values)
    assert not seg.in_order
    ordered = ops.Segments.build(torch.tensor([0, 0, 3, 3, -1]))  # the runner's order: rows read in place
    assert ordered.in_order and ordered.num_active == 4
    x = torch.randn(5, 3)
    assert ordered.gather(x).data_ptr() == x.data_ptr()
    assert not ops.Segments.build(torch.tensor([0, 0, 3, -1])).in_order  # unequal groups are padded
    skewed = ops.Segments.build(torch.tensor([0] * 40 + list(range(1, 20))))
    assert not skewed.use_grouped  # one hot adapter among many cold ones: loop over segments
    assert ops.Segments.build(torch.tensor([-1, -1])).slots == []


TRITON_CHECK = r'''
import itertools, sys, torch
from coserve.kernels import adapter_ops as ops, triton_adapter_ops as tri
from tests.kernels.adapter_cases import DTYPES, POPULARITY, RANKS, close, make_case
failures = []
for rank, pop, t, dtype in itertools.product(RANKS, POPULARITY, [1, 7], DTYPES):
    c = make_case(rank, pop, t, dtype)
    s = c["slots"]
    h_ref = ops.lora_shrink_ref(c["x"], c["a"], s)
    checks = {
        "lora_shrink": (tri.lora_shrink(c["x"], c["a"], s), h_ref),
        "lora_expand": (tri.lora_expand(c["y"].clone(), h_ref, c["bs"], s),
                        ops.lora_expand_ref(c["y"], h_ref, c["bs"], s)),
        "dora_scale": (tri.dora_scale(c["y"], c["gain"], s), ops.dora_scale_ref(c["y"], c["gain"], s)),
        "road_rotate": (tri.road_rotate(c["y"], c["c1"], c["c2"], c["partner"], s),
                        ops.road_rotate_ref(c["y"], c["c1"], c["c2"], c["partner"], s)),
        "sparse_delta": (tri.sparse_delta(c["x"], c["rows"], c["cols"], c["vals"], 40, s),
                         ops.sparse_delta_ref(c["x"], c["rows"], c["cols"], c["vals"], 40, s)),
    }
    for name, (got, ref) in checks.items():
        if not close(got, ref, dtype):
            failures.append(f"{name} rank={rank} pop={pop} t={t} {dtype}")
print("checked", len(list(itertools.product(RANKS, POPULARITY, [1, 7], DTYPES))) * 5)
print("\n".join(failures))
sys.exit(1 if failures else 0)
'''


def test_triton_kernels_match_references_under_the_interpreter():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True,
                            timeout=600, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "checked 400" in result.stdout
