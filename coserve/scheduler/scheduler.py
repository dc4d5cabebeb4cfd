"""Token-level continuous batching. Pure Python: no torch.

Each step fills a token budget: running sequences first (decodes and the next
chunk of prompts already started), in arrival order, then waiting sequences in
arrival order (chunked prefill: a long prompt spreads over steps). When the KV
pool runs dry, the most recently arrived running sequence is preempted: its
blocks are freed and it is recomputed later (its full blocks usually survive in
the prefix cache). First come, first served; nothing is skipped ahead of a
blocked head of queue, so nothing starves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from coserve.scheduler.block_manager import BlockManager
from coserve.scheduler.outputs import (
    RowKind,
    RunnerOutput,
    SampledToken,
    ScheduledSequence,
    SchedulerOutput,
)
from coserve.scheduler.request import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_batch_tokens: int = 2048  # tokens computed per step
    max_model_len: int = 4096  # prompt + output tokens per sequence
    block_size: int = 16  # token slots per KV block
    enable_prefix_caching: bool = True


class AdapterGate(Protocol):
    """Adapter residency as the scheduler sees it (implemented by the engine over its slots)."""

    def can_admit(self, adapter_id: str) -> bool:
        """Whether a sequence of this adapter may start now (loaded, and a slot is or can be freed)."""
        ...

    def on_admit(self, adapter_id: str) -> None:
        """A sequence of this adapter starts running: take (or share) its slot."""
        ...

    def on_release(self, adapter_id: str) -> None:
        """A sequence of this adapter stopped running (finished or preempted)."""
        ...


class RequestRejected(ValueError):
    """A request that can never be scheduled; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class StepUpdate:
    """What one step changed for one sequence (for detokenising and streaming)."""

    seq: Sequence
    sampled: SampledToken | None  # the new token, if the step sampled one
    finished: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, adapters: AdapterGate | None = None):
        self.config = config
        self.blocks = block_manager
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._by_request: dict[str, list[Sequence]] = {}
        self._finished_ids: list[int] = []
        self.num_preemptions = 0

    # ---- requests ----
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise RequestRejected if a request of this size could never run."""
        total = num_prompt_tokens + max_tokens
        if num_prompt_tokens == 0:
            raise RequestRejected("the prompt is empty", "prompt")
        if total > self.config.max_model_len:
            raise RequestRejected(
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) is {total}, "
                f"beyond the context window of {self.config.max_model_len} tokens",
                "max_tokens",
            )
        if self.blocks.blocks_for(total) > self.blocks.num_blocks:
            raise RequestRejected(
                f"{total} tokens need more KV-cache blocks than the pool holds "
                f"({self.blocks.num_blocks} blocks of {self.blocks.block_size})",
                "max_tokens",
            )

    def add(self, seqs: list[Sequence]) -> None:
        """Queue the n sequences of one request; siblings wait for the first one's prompt."""
        first = seqs[0]
        self.check_fits(first.num_prompt_tokens, first.params.max_tokens)
        if first.request_id in self._by_request:
            raise RequestRejected(f"duplicate request id {first.request_id!r}", "request_id")
        for sibling in seqs[1:]:
            sibling.leader = first
        self._by_request[first.request_id] = seqs
        self.waiting.extend(seqs)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of a request with reason ABORT."""
        seqs = self._by_request.get(request_id, [])
        aborted = [s for s in seqs if not s.is_finished]
        for seq in aborted:
            self._finish(seq, FinishReason.ABORT)
        return aborted

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_requests_running(self) -> int:
        return len({s.request_id for s in self.running})

    @property
    def num_requests_waiting(self) -> int:
        running = {s.request_id for s in self.running}
        return len({s.request_id for s in self.waiting} - running)

    def running_adapters(self) -> set[str]:
        return {s.adapter_id for s in self.running if s.adapter_id}

    def waiting_adapters(self) -> set[str]:
        return {s.adapter_id for s in self.waiting if s.adapter_id}

    # ---- one step ----
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_seq_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_batch_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_append(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: nothing left behind it either
            self.blocks.append(seq, num_new)
            out.sequences.append(self._row(seq, num_new))
            budget -= num_new
            i += 1
        if out.num_preempted == 0:
            budget = self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._waits_for_leader(seq) or (
                seq.adapter_id and self.adapters is not None and not self.adapters.can_admit(seq.adapter_id)
            ):  # not ready yet: let the requests behind it go (admission by adapter, no slot thrash)
                skipped.append(self.waiting.popleft())
                continue
            cached = self.blocks.find_cached_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * self.blocks.block_size, budget)
            if not self.blocks.can_allocate(seq, cached, num_new):
                break  # head of queue blocked: admit nothing behind it (no starvation)
            self.waiting.popleft()
            self.blocks.allocate(seq, cached, num_new)
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            if seq.adapter_id and self.adapters is not None:
                self.adapters.on_admit(seq.adapter_id)
            self.running.append(seq)
            out.sequences.append(self._row(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    @staticmethod
    def _waits_for_leader(seq: Sequence) -> bool:
        leader = seq.leader
        return leader is not None and not leader.is_finished and leader.in_prefill

    def _row(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        end = start + num_new
        is_decode = num_new == 1 and seq.output_token_ids and end == seq.num_tokens
        return ScheduledSequence(
            seq_id=seq.seq_id,
            kind=RowKind.DECODE if is_decode else RowKind.PREFILL,
            token_ids=seq.tokens_between(start, end),
            start_position=start,
            block_table=list(seq.block_ids),
            sample=end == seq.num_tokens,
            params=seq.params,
            output_token_ids=seq.output_token_ids,
            seed_offset=seq.index,
            adapter_id=seq.adapter_id,
        )

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_adapter(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_id and self.adapters is not None:
            self.adapters.on_release(seq.adapter_id)

    # ---- results ----
    def update(self, scheduled: SchedulerOutput, result: RunnerOutput) -> list[StepUpdate]:
        """Apply a step's results; returns what changed for each scheduled sequence."""
        updates = []
        running = {s.seq_id: s for s in self.running}
        for row in scheduled.sequences:
            seq = running.get(row.seq_id)
            if seq is None:  # aborted while the step ran
                continue
            seq.num_computed_tokens += len(row.token_ids)
            self.blocks.cache_full_blocks(seq)
            sampled = result.sampled.get(row.seq_id) if row.sample else None
            if sampled is not None:
                seq.output_token_ids.append(sampled.token_id)
                reason = self._stop_reason(seq, sampled.token_id)
                if reason is not None:
                    self._finish(seq, reason)
            updates.append(StepUpdate(seq, sampled, seq.is_finished))
        return updates

    def _stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.params
        if not params.ignore_eos and token_id in seq.eos_token_ids:
            return FinishReason.STOP
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= params.max_tokens:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish a sequence from outside (a stop string matched by the detokenizer)."""
        if not seq.is_finished:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release_adapter(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._finished_ids.append(seq.seq_id)
        siblings = self._by_request.get(seq.request_id, [])
        if all(s.is_finished for s in siblings):
            self._by_request.pop(seq.request_id, None)
