"""The contract between the scheduler and the model runner: plain data only.

One `SchedulerOutput` per engine step goes to the runner; one `RunnerOutput`
comes back. Nothing here imports torch, so the scheduler can be tested alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from coserve.scheduler.request import SamplingParams


class RowKind(str, enum.Enum):
    PREFILL = "prefill"  # prompt tokens (possibly one chunk of a long prompt)
    DECODE = "decode"  # exactly one newly sampled token
    TRAIN = "train"  # fine-tuning tokens (reserved for co-served training)


@dataclass
class ScheduledSequence:
    """What the runner computes for one sequence in this step."""

    seq_id: int  # stable id of the sequence; the runner keys per-sequence state by it
    kind: RowKind  # how these rows are used
    token_ids: list[int]  # the tokens to run this step, len = num_new_tokens
    start_position: int  # absolute position of token_ids[0]; K/V of [0, start) are cached
    block_table: list[int]  # KV block ids covering positions [0, start + len(token_ids))
    sample: bool  # True when this chunk ends at the last known token: sample one new token
    params: SamplingParams  # sampling parameters of the owning request
    output_token_ids: list[int]  # tokens generated so far (read-only; for penalties)
    seed_offset: int = 0  # sibling index for n > 1, so seeded siblings differ
    adapter_id: str | None = None  # adapter the sequence uses (None: the base model)
    adapter_slot: int = -1  # device adapter slot, filled in by the engine; -1 means the base model alone
    train_job_id: str | None = None  # set for TRAIN rows (co-served fine-tuning)


@dataclass
class SchedulerOutput:
    """One step's batch: rows are laid out in `sequences` order."""

    sequences: list[ScheduledSequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # runner may drop their state
    num_preempted: int = 0  # sequences preempted while building this step

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass
class SampledToken:
    """The runner's result for one sequence that sampled this step."""

    token_id: int
    logprob: float | None = None  # log-probability of token_id under the model (if asked)
    top_logprobs: list[TokenLogprob] | None = None  # the k most likely alternatives


@dataclass
class RunnerOutput:
    sampled: dict[int, SampledToken] = field(default_factory=dict)  # seq_id -> token
    train_losses: dict[str, float] = field(default_factory=dict)  # job id -> loss (co-serving)
