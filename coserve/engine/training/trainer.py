"""A fine-tuning job inside the engine: data order, micro-batches, forward chunks and backward stages
handed out step by step, AdamW with warmup then linear decay, clipping, accumulation, validation
loss, checkpoints. Runs on the engine thread; reports through `TrainingEvent`s to the job's sink."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from coserve.adapters.types import BaseModelShape
from coserve.engine.training import checkpoint
from coserve.engine.training.coforward import IGNORE, PassState, TrainRows, backward_layers
from coserve.engine.training.params import AdapterSpec, TrainableAdapter, skipped_shares


@dataclass
class TrainSample:
    token_ids: list[int]
    loss_mask: list[bool]  # per token: True when the model must learn to produce it (completion/assistant)

    def labels(self) -> list[int]:
        """Per position: the next token when it is a target, else IGNORE (the last position predicts nothing)."""
        ids, mask = self.token_ids, self.loss_mask
        return [ids[j + 1] if mask[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask[1:])


@dataclass
class TrainingJobSpec:
    """Everything the engine needs to run a job (built by the job worker from the API request)."""

    job_id: str
    base_model: str  # recorded in the adapter's config
    adapter: AdapterSpec
    train: list[TrainSample]
    validation: list[TrainSample] = field(default_factory=list)
    n_epochs: int = 3
    batch_size: int = 4  # samples per optimizer step (accumulated over micro-batches)
    learning_rate: float = 2e-4
    seed: int = 0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 10  # optimizer steps between checkpoints
    microbatch_tokens: int = 1024  # tokens forwarded before a backward pass (activation memory bound)
    init_tensors: dict[str, torch.Tensor] | None = None  # continue training this adapter (PEFT names)
    resume: bytes | None = None  # a checkpoint blob to continue from
    max_steps: int | None = None  # stop after this many optimizer steps (the module-selection probe)


@dataclass
class TrainingEvent:
    job_id: str
    kind: str  # metrics | checkpoint | succeeded | failed | cancelled
    data: dict = field(default_factory=dict)
    payload: bytes | None = None  # checkpoint: the resumable state
    files: tuple[bytes, bytes] | None = None  # succeeded: (adapter_config.json, adapter_model.safetensors)


class TrainingFailed(Exception):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def lr_factor(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup over `warmup` steps, then linear decay towards 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


class TrainingJob:
    def __init__(self, spec: TrainingJobSpec, shape: BaseModelShape, base_weights,
                 sink: Callable[[TrainingEvent], None]):
        if not spec.train:
            raise TrainingFailed("invalid_training_file", "the training file has no examples", "training_file")
        self.spec, self.sink, self.num_layers = spec, sink, shape.num_layers
        self.adapter = TrainableAdapter(spec.adapter, shape, base_weights, spec.seed)
        if spec.init_tensors is not None:
            self.adapter.load_peft_tensors(spec.init_tensors)
        self.params = [p for p in self.adapter.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
        self.steps_per_epoch = math.ceil(len(spec.train) / spec.batch_size)
        self.total_steps = spec.n_epochs * self.steps_per_epoch
        if spec.max_steps is not None:
            self.total_steps = min(self.total_steps, spec.max_steps)
        warmup = round(self.total_steps * spec.warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(warmup, self.total_steps))
        self.rng = torch.Generator().manual_seed(spec.seed)
        self.progress = checkpoint.Progress()
        if spec.resume is not None:
            self.progress, tensors = checkpoint.restore(spec.resume, self.optimizer, self.scheduler, self.rng)
            self.adapter.load_peft_tensors(tensors)
            self.adapter.set_thresholds(self.progress.thresholds or {})
        self.phase = "train"  # train | eval | done
        self.micro: list[list[int]] = []  # remaining micro-batches (sample indices) of the current batch
        self.eval_micro: list[list[int]] = []
        self.batch_size_now = 0
        self.batch_loss = 0.0
        self.batch_targets = 0
        self.pass_: PassState | None = None
        self.pass_samples: list[TrainSample] = []
        self.forwarded: dict[int, int] = {}  # pass key -> tokens forwarded
        self.valid_loss: float | None = None
        self._eval_sum = 0.0
        self._eval_tokens = 0
        self._since = time.monotonic()
        self._tokens_since = 0
        self._late_gating: dict[str, list[int]] = {}  # TS-PEFT: (gated, kept) per part over the second half

    # ---- what the next step does ----
    def next_kind(self) -> str | None:
        """forward | backward | None (job finished)."""
        self._ensure_pass()
        if self.pass_ is None:
            return None
        if any(self.forwarded[k] < len(s.token_ids) for k, s in enumerate(self.pass_samples)):
            return "forward"
        return "backward"

    @property
    def pass_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.pass_samples)

    def forward_rows(self, budget: int) -> list[TrainRows]:
        """Chunks of the pass's sequences, in order, up to `budget` tokens. A training pass that will not be
        forwarded in one chunk recomputes its layers at backward time (see coforward)."""
        if self.pass_.grad and not any(self.forwarded.values()):
            self.pass_.recompute = budget < self.pass_tokens and self.adapter.recomputable
        rows = []
        for key, sample in enumerate(self.pass_samples):
            done = self.forwarded[key]
            n = min(len(sample.token_ids) - done, budget)
            if n <= 0:
                continue
            labels = sample.labels()
            rows.append(TrainRows(key, sample.token_ids[done : done + n], done, labels[done : done + n]))
            budget -= n
            if budget <= 0:
                break
        return rows

    def after_forward(self, rows: list[TrainRows]) -> None:
        for r in rows:
            self.forwarded[r.key] += len(r.token_ids)
        if self.pass_.grad:
            tokens = sum(len(r.token_ids) for r in rows)
            self.progress.trained_tokens += tokens
            self._tokens_since += tokens
        elif self.next_kind() == "backward":  # an evaluation pass is done once forwarded
            self._eval_sum += self.pass_.loss_sum
            self._eval_tokens += self.pass_.num_label_tokens
            self.pass_ = None
            if not self.eval_micro:
                self.valid_loss = self._eval_sum / max(1, self._eval_tokens)
                self.sink(TrainingEvent(self.spec.job_id, "metrics",
                                        {"step": self.progress.step, "valid_loss": self.valid_loss}))
                self.phase = "done" if self.progress.step >= self.total_steps else "train"
                self._finish_if_done()

    def backward(self, stages: int, model) -> None:
        backward_layers(self.pass_, stages, model, self.adapter)
        if not self.pass_.backward_done:
            return
        self.batch_loss += self.pass_.loss_sum
        self.pass_ = None
        if not self.micro:
            self._optimizer_step()

    @property
    def stages_left(self) -> int:
        state = self.pass_
        return self.num_layers + 1 if state.next_backward is None else state.next_backward + 1

    # ---- internals ----
    def _ensure_pass(self) -> None:
        if self.pass_ is not None or self.phase == "done":
            return
        spec = self.spec
        if self.phase == "eval":
            samples = spec.validation
            self._start_pass([samples[i] for i in self.eval_micro.pop(0)], PassState(self.num_layers, 1.0, False))
            return
        if not self.micro:  # a new optimizer batch
            order = self._epoch_order()
            batch = order[self.progress.cursor : self.progress.cursor + spec.batch_size]
            self.batch_size_now = len(batch)
            self.batch_targets = sum(spec.train[i].num_targets for i in batch)
            self.batch_loss = 0.0
            self.micro = self._pack(batch, spec.train)
        samples = [spec.train[i] for i in self.micro.pop(0)]
        self._start_pass(samples, PassState(self.num_layers, 1.0 / max(1, self.batch_targets)))

    def _start_pass(self, samples: list[TrainSample], state: PassState) -> None:
        self.pass_, self.pass_samples = state, samples
        self.forwarded = {k: 0 for k in range(len(samples))}

    def _epoch_order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + self.progress.epoch)
        return torch.randperm(len(self.spec.train), generator=gen).tolist()

    def _pack(self, indices: list[int], samples: list[TrainSample]) -> list[list[int]]:
        """Greedy micro-batches of at most microbatch_tokens tokens (one sample at least)."""
        micro, current, tokens = [], [], 0
        for i in indices:
            n = len(samples[i].token_ids)
            if current and tokens + n > self.spec.microbatch_tokens:
                micro.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += n
        return micro + ([current] if current else [])

    def _optimizer_step(self) -> None:
        spec, progress = self.spec, self.progress
        loss = self.batch_loss / max(1, self.batch_targets)
        if not math.isfinite(loss):
            raise TrainingFailed("training_diverged", f"the training loss became {loss} at step {progress.step + 1}; "
                                 "try a lower learning_rate_multiplier", "learning_rate_multiplier")
        norm = torch.nn.utils.clip_grad_norm_(self.params, spec.max_grad_norm)
        if not math.isfinite(float(norm)):
            raise TrainingFailed("training_diverged", f"gradients became non-finite at step {progress.step + 1}",
                                 "learning_rate_multiplier")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        counts = self.adapter.gate_step()  # TS-PEFT: per part (gated, kept) since the last step; thresholds move
        skipped = skipped_shares(counts)
        progress.step += 1
        if progress.step > self.total_steps // 2:
            for key, (seen, kept) in counts.items():
                totals = self._late_gating.setdefault(key, [0, 0])
                totals[0] += seen
                totals[1] += kept
        progress.last_loss = loss
        progress.cursor += self.batch_size_now
        if progress.cursor >= len(spec.train):
            progress.epoch, progress.cursor = progress.epoch + 1, 0
        now = time.monotonic()
        self.sink(TrainingEvent(spec.job_id, "metrics", {
            "step": progress.step, "train_loss": loss, "learning_rate": lr, "trained_tokens": progress.trained_tokens,
            "train_tokens_per_s": self._tokens_since / max(1e-9, now - self._since), "total_steps": self.total_steps,
            "epoch": progress.epoch, "grad_norm": float(norm),
            "token_sparsity": skipped.pop("overall", 0.0),  # share of token updates skipped (0: dense)
            "token_sparsity_per_module": skipped}))
        self._since, self._tokens_since = now, 0
        finished = progress.step >= self.total_steps
        if progress.step % spec.checkpoint_every == 0 and not finished:
            self.sink(TrainingEvent(spec.job_id, "checkpoint", {"step": progress.step, "train_loss": loss},
                                    payload=self.checkpoint()))
        if spec.validation and (finished or progress.step % spec.checkpoint_every == 0):
            self.phase, self._eval_sum, self._eval_tokens = "eval", 0.0, 0
            self.eval_micro = self._pack(list(range(len(spec.validation))), spec.validation)
            return
        if finished:
            self.phase = "done"
            self._finish_if_done()

    def _finish_if_done(self) -> None:
        if self.phase != "done":
            return
        data = {"trained_tokens": self.progress.trained_tokens, "train_loss": self.progress.last_loss,
                "valid_loss": self.valid_loss, "step": self.progress.step,
                # TS-PEFT: share of token updates applied per "layer:module" over the second half of training
                "token_density": {key: kept / seen for key, (seen, kept) in self._late_gating.items() if seen}}
        self.sink(TrainingEvent(self.spec.job_id, "succeeded", data,
                                files=self.adapter.peft_files(self.spec.base_model)))

    def checkpoint(self) -> bytes:
        self.progress.thresholds = self.adapter.thresholds()
        return checkpoint.dump(self.progress, self.adapter.named_peft_tensors(), self.optimizer, self.scheduler,
                               self.rng)
