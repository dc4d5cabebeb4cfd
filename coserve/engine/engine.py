"""The engine core: scheduler + adapter residency + runner + detokenizer in one synchronous
step() (LLMEngine). `async_engine.AsyncEngine` runs it in a loop with an asyncio face."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coserve.adapters.registry import AdapterSource
from coserve.adapters.types import LoadedAdapter
from coserve.engine.adapter_runtime import AdapterRuntime
from coserve.engine.detokenizer import IncrementalDetokenizer
from coserve.engine.loader import checkpoint_fingerprint, load_model
from coserve.engine.packed_linear import pack_linears
from coserve.engine.quantize import QuantizeReport, quantize_model
from coserve.engine.runner import KVCacheLayout, ModelRunner, allocate_kv_cache, plan_kv_cache
from coserve.engine.stats import RequestStats, StatsListener, StepStats
from coserve.engine.tokenizer import ModelTokenizer
from coserve.engine.training.cotrain import CoTrainer
from coserve.engine.training.trainer import TrainingEvent, TrainingJobSpec
from coserve.scheduler.block_manager import BlockManager
from coserve.scheduler.outputs import SampledToken
from coserve.scheduler.request import FinishReason, SamplingParams, Sequence
from coserve.scheduler.scheduler import RequestRejected, Scheduler, SchedulerConfig
from coserve.scheduler.train_share import TrainShareConfig

log = logging.getLogger("coserve.engine")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str  # Hugging Face checkpoint directory
    dtype: str = "bfloat16"  # compute dtype: bfloat16 | float32
    quantize: str = "none"  # none | int8 | int4
    int4_group_size: int = 128
    prepack_weights: bool = True  # 16-bit linears left after quantization run from oneDNN-packed weights (CPU)
    kv_cache_memory: int = 512 * 2**20  # bytes for the paged KV pool
    block_size: int = 16
    max_num_seqs: int = 64
    max_batch_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped at 8192
    enable_prefix_caching: bool = True
    seed: int = 0
    max_loras: int = 8  # device adapter slots
    max_cpu_loras: int = 32  # adapters kept validated in host memory
    max_lora_rank: int = 16  # highest LoRA rank accepted (slot buffers are padded to it)
    itl_slo_ms: float | None = 200.0  # fine-tuning work is sized so decode steps stay under this (None: no bound)


@dataclass
class SequenceDelta:
    """New output of one completion since the last RequestOutput."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[SampledToken]  # one per token in token_ids (when logprobs were asked)
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    num_prompt_tokens: int
    deltas: list[SequenceDelta]
    finished: bool  # every completion of the request has finished
    num_cached_tokens: int = 0
    num_output_tokens: int = 0  # over all completions so far
    error: str | None = None  # set when the engine failed this request


@dataclass
class _RequestState:
    request_id: str
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)  # seq index -> time of its last token


@dataclass(frozen=True)
class EngineInfo:
    model_dir: str
    dtype: str
    quantize: QuantizeReport
    kv: KVCacheLayout
    max_model_len: int
    fingerprint: str  # of the base checkpoint: stored adapters record the base they were validated on


class LLMEngine:
    """Synchronous core; one thread only (AsyncEngine owns it)."""

    def __init__(self, config: EngineConfig, stats: StatsListener | None = None):
        self.config = config
        dtype = DTYPES[config.dtype]
        self.tokenizer = ModelTokenizer.from_dir(config.model)
        self.model = load_model(config.model, dtype)
        self.quantize_report = quantize_model(self.model, config.quantize, config.int4_group_size)
        self.num_packed_linears = pack_linears(self.model) if config.prepack_weights else 0
        mc = self.model.config
        max_len = config.max_model_len or min(mc.max_position_embeddings, 8192)
        layout = plan_kv_cache(mc, config.kv_cache_memory, config.block_size, dtype)
        self.info = EngineInfo(str(Path(config.model)), config.dtype, self.quantize_report, layout, max_len,
                               checkpoint_fingerprint(config.model))
        self.eos_token_ids = frozenset(mc.eos_token_ids) | self.tokenizer.eos_token_ids
        sched_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_batch_tokens=config.max_batch_tokens,
            max_model_len=max_len,
            block_size=config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.blocks = BlockManager(layout.num_blocks, config.block_size, config.enable_prefix_caching)
        self.adapters = AdapterRuntime(self.model, config.max_loras, config.max_cpu_loras, config.max_lora_rank,
                                       on_timing=self._adapter_timing)
        self.scheduler = Scheduler(sched_config, self.blocks, self.adapters)
        self.runner = ModelRunner(self.model, allocate_kv_cache(mc, layout, dtype), config.block_size, config.seed,
                                  self.adapters)
        slo = config.itl_slo_ms / 1000 if config.itl_slo_ms else None
        self.training = CoTrainer(self.model, self.adapters.shape, TrainShareConfig(slo))
        self.stats = stats
        self._requests: dict[str, _RequestState] = {}
        self.last_step_tokens = 0  # tokens the last step computed (0: waiting on adapter loads, say)
        self._retired: set[str] = set()  # adapters to drop once no request uses them

    def _adapter_timing(self, timing) -> None:
        if self.stats is not None and hasattr(self.stats, "on_adapter_load"):
            self.stats.on_adapter_load(timing)

    # ---- requests ----
    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Raise RequestRejected if the request could never run (thread-safe: reads config only)."""
        self.scheduler.check_fits(num_prompt_tokens, params.max_tokens)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: str | None = None,
        adapter_source: AdapterSource | None = None,
    ) -> None:
        """Queue a request. An adapter the engine does not know yet is registered from `adapter_source`
        (a stored revision: loaded in the background while the request waits)."""
        if adapter_id is not None and not self.adapters.known(adapter_id):
            if adapter_source is None:
                raise RequestRejected(f"The model `{adapter_id}` does not exist.", "model")
            self.adapters.register(adapter_id, adapter_source)
        if adapter_source is not None:
            self._retired.discard(adapter_id)  # the caller resolved it as current
        now = time.monotonic()
        seqs = [
            Sequence(request_id, i, list(prompt_token_ids), params, adapter_id, now, self.eos_token_ids)
            for i in range(params.n)
        ]
        self.scheduler.add(seqs)
        detoks = [IncrementalDetokenizer(self.tokenizer, params.stop) for _ in seqs]
        self._requests[request_id] = _RequestState(request_id, seqs, detoks, now)

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self._requests.get(request_id)
        if state is None:
            return None
        self.scheduler.abort(request_id)
        return self._emit(state, {s.index for s in state.seqs}, {}, time.monotonic())

    def abort_all(self, error: str | None = None) -> list[RequestOutput]:
        outs = [self.abort(rid) for rid in list(self._requests)]
        for out in outs:
            if out is not None:
                out.error = error
        return [o for o in outs if o is not None]

    def register_adapter(self, name: str, source: AdapterSource, adapter: LoadedAdapter | None = None) -> None:
        """Serve `name` from `source` (replacing it needs it idle: RuntimeError otherwise)."""
        self.adapters.register(name, source, adapter)
        self._retired.discard(name)

    def retire_adapters(self, match: Callable[[str], bool]) -> None:
        """Drop the adapters `match` selects (replaced or deleted revisions) from the host cache and the
        device slots; those still used by queued or running requests go once those finish."""
        self._retired |= {name for name in self.adapters.names() if match(name)}
        self._collect_retired()

    def _collect_retired(self) -> None:
        if not self._retired:
            return
        in_use = self.scheduler.running_adapters() | self.scheduler.waiting_adapters()
        for name in self._retired - in_use:
            self.adapters.forget(name)
        self._retired &= in_use

    def publish_load(self) -> None:
        """Report running/waiting counts and KV use (after aborts, when no step follows)."""
        if self.stats is not None:
            s = self.scheduler
            self.stats.set_load(s.num_requests_running, s.num_requests_waiting, self.blocks.usage)

    def submit_training(self, spec: TrainingJobSpec, sink: Callable[[TrainingEvent], None]) -> None:
        """Train a job inside this engine's steps; events (metrics, checkpoints, the end) go to `sink`
        on the engine thread."""
        self.training.submit(spec, sink)

    def cancel_training(self, job_id: str) -> bool:
        return self.training.cancel(job_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self.training.has_work

    @property
    def num_active_requests(self) -> int:
        return len(self._requests)

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        start = time.monotonic()
        failed = self._start_adapter_loads()
        scheduled = self.scheduler.schedule()
        for seq in self.scheduler.running:
            state = self._requests.get(seq.request_id)
            if state is not None and state.first_scheduled is None:
                state.first_scheduled = start
        inference_tokens = scheduled.num_tokens
        plan = self.training.plan(inference_tokens, self.config.max_batch_tokens - inference_tokens)
        try:
            result = self.runner.execute(scheduled, plan.batch if plan else None)
        except Exception as exc:
            if plan is None or plan.batch is None:
                raise
            self.training.fail(plan.job, exc)  # the job's rows broke the step: fail the job, redo inference
            plan, result = None, self.runner.execute(scheduled)
        plan = self.training.advance(plan)
        self.last_step_tokens = inference_tokens + (plan.units if plan else 0)
        updates = self.scheduler.update(scheduled, result)
        now = time.monotonic()
        self.training.observe(plan, now - start, inference_tokens)
        touched: dict[str, set[int]] = {}
        new_tokens: dict[str, dict[int, SampledToken]] = {}
        itls, ttfts = [], []
        for up in updates:
            seq = up.seq
            state = self._requests.get(seq.request_id)
            if state is None or up.sampled is None:
                continue
            detok = state.detoks[seq.index]
            detok.add(up.sampled.token_id)
            if detok.stopped:
                self.scheduler.finish(seq, FinishReason.STOP)
            previous = state.last_token.get(seq.index)
            if previous is None:
                ttfts.append(now - state.arrival)
                state.first_token = state.first_token or now
            else:
                itls.append(now - previous)
            state.last_token[seq.index] = now
            touched.setdefault(seq.request_id, set()).add(seq.index)
            new_tokens.setdefault(seq.request_id, {})[seq.index] = up.sampled
        outputs = failed + [self._emit(self._requests[rid], idx, new_tokens[rid], now)
                            for rid, idx in touched.items()]
        self._collect_retired()
        if self.stats is not None and (not scheduled.is_empty or plan is not None):
            self.stats.on_step(
                StepStats(
                    step_time_s=now - start,
                    num_tokens=scheduled.num_tokens,
                    num_running=self.scheduler.num_requests_running,
                    num_waiting=self.scheduler.num_requests_waiting,
                    kv_usage=self.blocks.usage,
                    num_preempted=scheduled.num_preempted,
                    prefix_hit_rate=self.blocks.prefix_hit_rate,
                    inter_token_latencies_s=itls,
                    time_to_first_token_s=ttfts,
                    num_generated_tokens=len(itls) + len(ttfts),
                    running_adapters=sorted(self.scheduler.running_adapters()),
                    waiting_adapters=sorted(self.scheduler.waiting_adapters()),
                    num_train_tokens=plan.units if plan is not None and plan.kind == "forward" else 0,
                    num_train_jobs=len(self.training.jobs),
                )
            )
        return outputs

    def _start_adapter_loads(self) -> list[RequestOutput]:
        """Prefetch the adapters waiting requests need; fail the requests whose adapter cannot load."""
        waiting = self.scheduler.waiting_adapters()
        for adapter_id in waiting:
            self.adapters.host.prefetch(adapter_id)
        outputs = []
        for adapter_id, reason in self.adapters.take_failures(waiting).items():
            for rid in {s.request_id for s in self.scheduler.waiting if s.adapter_id == adapter_id}:
                out = self.abort(rid)
                if out is not None:
                    out.error = f"adapter {adapter_id} failed to load: {reason}"
                    outputs.append(out)
        return outputs

    def _emit(
        self, state: _RequestState, indices: set[int], sampled: dict[int, SampledToken], now: float
    ) -> RequestOutput:
        deltas = []
        for i in sorted(indices):
            seq = state.seqs[i]
            token = sampled.get(i)
            text = state.detoks[i].take(final=seq.is_finished)
            reason = seq.finish_reason.value if seq.finish_reason else None
            if token is None and not text and reason is None:
                continue
            deltas.append(
                SequenceDelta(
                    index=i,
                    text=text,
                    token_ids=[token.token_id] if token else [],
                    logprobs=[token] if token and token.logprob is not None else [],
                    finish_reason=reason,
                )
            )
        finished = all(s.is_finished for s in state.seqs)
        out = RequestOutput(
            request_id=state.request_id,
            num_prompt_tokens=state.seqs[0].num_prompt_tokens,
            deltas=deltas,
            finished=finished,
            num_cached_tokens=state.seqs[0].num_cached_prompt_tokens,
            num_output_tokens=sum(len(s.output_token_ids) for s in state.seqs),
        )
        if finished:
            del self._requests[state.request_id]
            if self.stats is not None:
                self.stats.on_request_done(_request_stats(state, now, out))
        return out


def _request_stats(state: _RequestState, now: float, out: RequestOutput) -> RequestStats:
    first_scheduled = state.first_scheduled or now
    first_token = state.first_token or now
    reasons = [s.finish_reason.value for s in state.seqs if s.finish_reason]
    return RequestStats(
        finish_reason=reasons[0] if reasons else FinishReason.ABORT.value,
        queue_time_s=first_scheduled - state.arrival,
        prefill_time_s=first_token - first_scheduled,
        decode_time_s=now - first_token,
        e2e_latency_s=now - state.arrival,
        num_prompt_tokens=out.num_prompt_tokens,
        num_generated_tokens=out.num_output_tokens,
    )


__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "RequestRejected", "SequenceDelta"]
