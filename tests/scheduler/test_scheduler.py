"""Scheduler and block manager on fake requests: no torch, no model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from coserve.scheduler.block_manager import BlockManager
from coserve.scheduler.outputs import RowKind, RunnerOutput, SampledToken
from coserve.scheduler.request import FinishReason, SamplingParams, Sequence, SequenceStatus
from coserve.scheduler.scheduler import RequestRejected, Scheduler, SchedulerConfig

EOS = 0


def make_scheduler(num_blocks=64, block_size=4, **kw) -> Scheduler:
    config = SchedulerConfig(block_size=block_size, **kw)
    return Scheduler(config, BlockManager(num_blocks, block_size, config.enable_prefix_caching))


def request(rid: str, prompt: list[int], max_tokens=8, n=1) -> list[Sequence]:
    params = SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=False)
    return [Sequence(rid, i, list(prompt), params, eos_token_ids=frozenset({EOS})) for i in range(n)]


def fake_step(s: Scheduler, token=7):
    """Schedule one step and pretend the model sampled `token` for every sampling row."""
    out = s.schedule()
    result = RunnerOutput(sampled={r.seq_id: SampledToken(token) for r in out.sequences if r.sample})
    s.update(out, result)
    return out


def test_scheduler_imports_no_torch():
    code = "import sys, coserve.scheduler.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_token_budget_and_chunked_prefill():
    s = make_scheduler(max_batch_tokens=10)
    s.add(request("long", list(range(1, 26))))  # 25 prompt tokens
    s.add(request("short", [1, 2, 3]))
    first = fake_step(s)
    assert first.num_tokens == 10
    assert [len(r.token_ids) for r in first.sequences] == [10]
    assert not first.sequences[0].sample
    second = fake_step(s)
    assert [len(r.token_ids) for r in second.sequences] == [10]
    third = fake_step(s)  # the last 5 prompt tokens, then the short prompt fills the rest
    assert [len(r.token_ids) for r in third.sequences] == [5, 3]
    assert all(r.sample for r in third.sequences)
    assert third.sequences[0].start_position == 20
    fourth = fake_step(s)
    assert [r.kind for r in fourth.sequences] == [RowKind.DECODE, RowKind.DECODE]
    assert all(step.num_tokens <= 10 for step in (first, second, third, fourth))


def test_decodes_go_before_new_prefills_and_seq_cap():
    s = make_scheduler(max_batch_tokens=100, max_num_seqs=2)
    for i in range(3):
        s.add(request(f"r{i}", [1, 2, 3, 4, 5]))
    out = fake_step(s)
    assert len(out.sequences) == 2  # sequence cap
    out = fake_step(s)
    assert [r.kind for r in out.sequences] == [RowKind.DECODE, RowKind.DECODE]
    assert s.num_requests_waiting == 1


def test_finishes_on_max_tokens_and_eos():
    s = make_scheduler()
    s.add(request("a", [1, 2, 3], max_tokens=3))
    s.add(request("b", [4, 5, 6], max_tokens=10))
    fake_step(s)
    out = s.schedule()
    tokens = {r.seq_id: SampledToken(7 if i == 0 else EOS) for i, r in enumerate(out.sequences)}
    updates = s.update(out, RunnerOutput(sampled=tokens))
    by_req = {u.seq.request_id: u.seq for u in updates}
    assert by_req["b"].finish_reason is FinishReason.STOP
    fake_step(s)
    assert by_req["a"].finish_reason is FinishReason.LENGTH
    assert len(by_req["a"].output_token_ids) == 3
    assert not s.has_work
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_preemption_frees_latest_arrival_and_recomputes():
    # 6 blocks of 4 slots; two sequences of 8-token prompts each grow by one block every 4 tokens.
    s = make_scheduler(num_blocks=6, block_size=4, max_batch_tokens=64, enable_prefix_caching=False)
    s.add(request("old", list(range(1, 9)), max_tokens=12))
    s.add(request("new", list(range(11, 19)), max_tokens=12))
    preempted_names = []
    for _ in range(40):
        if not s.has_work:
            break
        out = fake_step(s)
        if out.num_preempted:
            preempted_names.extend(seq.request_id for seq in s.waiting)
    assert preempted_names and set(preempted_names) == {"new"}  # the latest arrival gives way
    assert not s.has_work
    assert s.num_preemptions >= 1
    assert s.blocks.num_free_blocks == 6


def test_no_starvation_fcfs():
    s = make_scheduler(num_blocks=8, block_size=4, max_batch_tokens=16)
    s.add(request("first", list(range(1, 21)), max_tokens=4))  # needs 6 blocks
    s.add(request("second", list(range(30, 50)), max_tokens=4))
    finished_order = []
    for _ in range(100):
        if not s.has_work:
            break
        out = s.schedule()
        res = RunnerOutput(sampled={r.seq_id: SampledToken(7) for r in out.sequences if r.sample})
        for u in s.update(out, res):
            if u.finished:
                finished_order.append(u.seq.request_id)
    assert finished_order == ["first", "second"]


def test_rejects_requests_that_can_never_fit():
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(RequestRejected) as exc:
        s.add(request("big", list(range(1, 10)), max_tokens=60))
    assert exc.value.param == "max_tokens"
    with pytest.raises(RequestRejected, match="KV-cache blocks"):
        s.add(request("pool", list(range(1, 10)), max_tokens=10))  # 19 tokens > 16 slots
    with pytest.raises(RequestRejected):
        s.add(request("empty", []))


def test_abort_frees_blocks_and_queued_never_runs():
    s = make_scheduler(max_num_seqs=1)
    s.add(request("running", [1, 2, 3, 4, 5, 6]))
    s.add(request("queued", [1, 2, 3]))
    fake_step(s)
    assert s.blocks.num_free_blocks < s.blocks.num_blocks
    s.abort("queued")
    s.abort("running")
    out = s.schedule()
    assert out.is_empty and len(out.finished_seq_ids) == 2
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_prefix_cache_shares_full_blocks_and_counts_hits():
    s = make_scheduler(num_blocks=32, block_size=4)
    prompt = list(range(1, 15))  # 14 tokens: 3 full blocks
    s.add(request("a", prompt, max_tokens=2))
    while s.has_work:
        fake_step(s)
    s.add(request("b", prompt, max_tokens=2))
    out = fake_step(s)
    row = out.sequences[0]
    assert row.start_position == 12  # three cached blocks reused
    assert len(row.token_ids) == 2
    assert s.blocks.prefix_hit_tokens == 12
    assert 0 < s.blocks.prefix_hit_rate < 1


def test_prefix_cache_key_includes_adapter():
    s = make_scheduler(num_blocks=32, block_size=4)
    prompt = list(range(1, 15))
    s.add(request("a", prompt, max_tokens=1))
    while s.has_work:
        fake_step(s)
    seqs = request("b", prompt, max_tokens=1)
    for seq in seqs:
        seq.adapter_id = "tenant-lora"
    s.add(seqs)
    assert fake_step(s).sequences[0].start_position == 0


def test_n_siblings_share_the_prompt_blocks():
    s = make_scheduler(num_blocks=32, block_size=4, max_batch_tokens=64)
    s.add(request("n3", list(range(1, 18)), max_tokens=3, n=3))  # 17 tokens: 4 full blocks
    first = fake_step(s)
    assert len(first.sequences) == 1  # siblings wait for the leader's prompt
    second = fake_step(s)
    sibling_rows = [r for r in second.sequences if r.kind is RowKind.PREFILL]
    assert len(sibling_rows) == 2 and all(r.start_position == 16 for r in sibling_rows)
    leader_blocks = s.running[0].block_ids[:4]
    assert all(seq.block_ids[:4] == leader_blocks for seq in s.running)
    assert {r.seed_offset for r in second.sequences} == {0, 1, 2}


def test_block_manager_check_does_not_mutate():
    bm = BlockManager(4, 4)
    seq = request("x", [1, 2, 3, 4, 5])[0]
    assert bm.can_allocate(seq, [], 5)
    assert bm.num_free_blocks == 4 and not seq.block_ids
    bm.allocate(seq, [], 5)
    assert len(seq.block_ids) == 2 and bm.num_free_blocks == 2
    assert seq.status is SequenceStatus.WAITING
