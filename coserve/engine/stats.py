"""What the engine reports about its work, as plain data. The server turns it into metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class StepStats:
    step_time_s: float  # wall time of schedule + forward + sampling + bookkeeping
    num_tokens: int  # tokens computed in the step (prefill chunks + decodes)
    num_running: int  # requests running after the step
    num_waiting: int  # requests waiting after the step
    kv_usage: float  # fraction of KV blocks in use (0..1)
    num_preempted: int  # sequences preempted while building the step
    prefix_hit_rate: float  # prompt tokens served from the prefix cache / prompt tokens admitted
    inter_token_latencies_s: list[float] = field(default_factory=list)  # one per non-first new token
    time_to_first_token_s: list[float] = field(default_factory=list)  # one per sequence's first token
    num_generated_tokens: int = 0
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    num_train_tokens: int = 0  # fine-tuning tokens forwarded in the step
    num_train_jobs: int = 0  # fine-tuning jobs in the engine after the step


@dataclass
class RequestStats:
    finish_reason: str  # stop | length | abort
    queue_time_s: float  # arrival -> first scheduled
    prefill_time_s: float  # first scheduled -> first token
    decode_time_s: float  # first token -> finished
    e2e_latency_s: float  # arrival -> finished
    num_prompt_tokens: int
    num_generated_tokens: int


class StatsListener(Protocol):
    def on_step(self, stats: StepStats) -> None: ...

    def on_request_done(self, stats: RequestStats) -> None: ...

    def set_load(self, running: int, waiting: int, kv_usage: float) -> None: ...
