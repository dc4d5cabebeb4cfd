"""Executes one SchedulerOutput: one fused forward over all rows, then sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coserve.engine.model import CausalLM, ModelConfig
from coserve.engine.sampler import SampleRow, sample
from coserve.engine.training.coforward import PassState, TrainRows, coserved_forward
from coserve.engine.training.params import TrainableAdapter
from coserve.kernels.attention import AttentionMetadata
from coserve.scheduler.outputs import RunnerOutput, SchedulerOutput


@dataclass(frozen=True)
class KVCacheLayout:
    num_blocks: int
    block_size: int
    bytes_per_block: int  # K and V across all layers


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * elem


def plan_kv_cache(config: ModelConfig, memory_bytes: int, block_size: int, dtype: torch.dtype) -> KVCacheLayout:
    per_block = kv_bytes_per_block(config, block_size, dtype)
    num_blocks = memory_bytes // per_block
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory of {memory_bytes} bytes holds no block ({per_block} bytes each)")
    return KVCacheLayout(int(num_blocks), block_size, per_block)


def allocate_kv_cache(
    config: ModelConfig, layout: KVCacheLayout, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair per layer, each [num_blocks, block_size, Hkv, head_dim]."""
    shape = (layout.num_blocks, layout.block_size, config.num_key_value_heads, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(config.num_hidden_layers)]


@dataclass
class TrainBatch:
    """Fine-tuning rows that join this step's forward."""

    rows: list[TrainRows]  # one chunk per training sequence
    state: PassState  # the micro-batch's activations and loss so far
    adapter: TrainableAdapter  # the job's trainable adapter

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches, block_size: int, seed: int = 0, adapters=None):
        self.model = model
        self.adapters = adapters  # AdapterRuntime: groups each step's tokens by adapter slot
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.default_generator = torch.Generator().manual_seed(seed)
        self._generators: dict[int, torch.Generator] = {}  # seq_id -> seeded generator

    def _generator(self, seq_id: int, seed: int | None, offset: int) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(seq_id)
        if gen is None:
            gen = self._generators[seq_id] = torch.Generator().manual_seed(seed + offset)
        return gen

    def execute(self, step: SchedulerOutput, train: TrainBatch | None = None) -> RunnerOutput:
        """Run the step's rows (and, with `train`, one chunk of fine-tuning rows in the same forward)."""
        for seq_id in step.finished_seq_ids:
            self._generators.pop(seq_id, None)
        if train is not None:
            return self._execute(step, train)  # autograd needed: no inference_mode
        with torch.inference_mode():
            return self._execute(step, None)

    def _execute(self, step: SchedulerOutput, train: TrainBatch | None) -> RunnerOutput:
        if step.is_empty and train is None:
            return RunnerOutput()
        rows = step.sequences if self.adapters is None else self.adapters.order_by_slot(step.sequences)
        input_ids = torch.tensor([t for r in rows for t in r.token_ids], dtype=torch.long)  # [T]
        positions = torch.tensor(
            [p for r in rows for p in range(r.start_position, r.start_position + len(r.token_ids))], dtype=torch.long
        )  # [T]
        meta = AttentionMetadata.build(
            [len(r.token_ids) for r in rows], [r.start_position for r in rows], [r.block_table for r in rows],
            self.block_size,
        ) if rows else None
        if self.adapters is not None:
            self.adapters.begin_step(rows, train.num_tokens if train is not None else 0)
        try:
            if train is None:
                hidden = self.model(input_ids, positions, meta, self.kv_caches)  # [T, hidden]
            else:
                hidden = coserved_forward(self.model, input_ids, positions, meta, self.kv_caches, train.rows,
                                          train.state, train.adapter)  # [T, hidden]; training rows kept aside
        finally:
            if self.adapters is not None:
                self.adapters.end_step()
        sampling = [i for i, r in enumerate(rows) if r.sample]
        if not sampling:
            return RunnerOutput()
        with torch.inference_mode():
            return self._sample(rows, sampling, meta, hidden)

    def _sample(self, rows, sampling: list[int], meta: AttentionMetadata, hidden: torch.Tensor) -> RunnerOutput:
        last_rows = torch.tensor([meta.query_starts[i] + meta.query_lens[i] - 1 for i in sampling])
        logits = self.model.logits(hidden[last_rows], upcast=False)  # [R, vocab] compute dtype
        sample_rows = [
            SampleRow(
                rows[i].params,
                rows[i].output_token_ids,
                self._generator(rows[i].seq_id, rows[i].params.seed, rows[i].seed_offset),
            )
            for i in sampling
        ]
        tokens = sample(logits, sample_rows, self.default_generator)
        return RunnerOutput(sampled={rows[i].seq_id: tok for i, tok in zip(sampling, tokens)})
