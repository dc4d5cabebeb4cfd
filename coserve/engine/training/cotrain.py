"""The engine's fine-tuning side: jobs submitted to this engine (one trains at a time, the others
wait), and each step's share of fine-tuning work (forward chunk or backward stages) sized by the
TrainShareController. A failure inside a job fails that job only."""

from __future__ import annotations

import logging
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from coserve.adapters.layers import PACKED_PARTS, base_weight
from coserve.adapters.types import BaseModelShape
from coserve.engine.model import CausalLM
from coserve.engine.runner import TrainBatch
from coserve.engine.training.trainer import TrainingEvent, TrainingFailed, TrainingJob, TrainingJobSpec
from coserve.scheduler.train_share import TrainShareConfig, TrainShareController

log = logging.getLogger("coserve.training")


@dataclass
class TrainPlan:
    """This step's fine-tuning work."""

    job: TrainingJob
    kind: str  # forward | backward
    batch: TrainBatch | None = None  # forward: the rows joining the fused forward
    stages: int = 0  # backward: layers to run backward on
    units: int = 0  # forward: tokens; backward: tokens x stages (what the controller measures)


class CoTrainer:
    def __init__(self, model: CausalLM, shape: BaseModelShape, share: TrainShareConfig):
        self.model, self.shape = model, shape
        model.requires_grad_(False)  # only adapter parameters train: no gradients for the base (lm_head, norms)
        self.controller = TrainShareController(share)
        self.jobs: deque[TrainingJob] = deque()
        self._sinks: dict[str, Callable[[TrainingEvent], None]] = {}

    def base_weight_of(self, layer: int, module: str):
        """The served weight rows of one HF module [out, in] float32 (DoRA's initial magnitudes)."""
        c = self.shape.module_shapes
        for packed, parts in PACKED_PARTS.items():
            if module in parts:
                owner, attr = packed.split(".")
                linear = getattr(getattr(self.model.model.layers[layer], owner), attr)
                lo = sum(c[p][0] for p in parts[: parts.index(module)])
                return base_weight(getattr(linear, "base", linear))[lo : lo + c[module][0]]
        raise KeyError(module)

    # ---- jobs (engine thread) ----
    def submit(self, spec: TrainingJobSpec, sink: Callable[[TrainingEvent], None]) -> None:
        try:
            self.jobs.append(TrainingJob(spec, self.shape, self.base_weight_of, sink))
        except TrainingFailed as exc:
            sink(_failure(spec.job_id, exc.code, exc.message, exc.param))
        except (ValueError, RuntimeError) as exc:
            sink(_failure(spec.job_id, "invalid_job", str(exc), "adapter"))

    def cancel(self, job_id: str) -> bool:
        for job in list(self.jobs):
            if job.spec.job_id == job_id:
                self.jobs.remove(job)
                job.sink(TrainingEvent(job_id, "cancelled"))
                return True
        return False

    def fail(self, job: TrainingJob, exc: BaseException) -> None:
        """Drop the job after an exception in its work; inference is not affected."""
        if job in self.jobs:
            self.jobs.remove(job)
        if isinstance(exc, TrainingFailed):
            job.sink(_failure(job.spec.job_id, exc.code, exc.message, exc.param))
        else:
            log.error("fine-tuning job %s failed:\n%s", job.spec.job_id, traceback.format_exc())
            job.sink(_failure(job.spec.job_id, "training_error", f"{type(exc).__name__}: {exc}", None))

    @property
    def has_work(self) -> bool:
        return bool(self.jobs)

    # ---- per step ----
    def plan(self, inference_tokens: int, leftover_tokens: int) -> TrainPlan | None:
        while self.jobs:
            job = self.jobs[0]
            try:
                kind = job.next_kind()
            except Exception as exc:  # noqa: BLE001 - a job's failure stays with the job
                self.fail(job, exc)
                continue
            if kind is None:
                self.jobs.popleft()
                continue
            if self.controller.needs_probe(inference_tokens):
                return None
            if kind == "forward":
                tokens = self.controller.forward_tokens(inference_tokens, leftover_tokens)
                rows = job.forward_rows(tokens) if tokens > 0 else []
                if not rows:
                    return None
                batch = TrainBatch(rows, job.pass_, job.adapter)
                return TrainPlan(job, "forward", batch, units=batch.num_tokens)
            stages = self.controller.backward_stages(inference_tokens, job.pass_tokens, job.stages_left)
            return TrainPlan(job, "backward", stages=stages, units=stages * job.pass_tokens)
        return None

    def advance(self, plan: TrainPlan | None) -> TrainPlan | None:
        """After the step's forward: run the planned backward stages or record the forwarded chunk.
        Returns the plan, or None when the job failed doing it."""
        if plan is None:
            return None
        try:
            if plan.kind == "forward":
                plan.job.after_forward(plan.batch.rows)
            else:
                plan.job.backward(plan.stages, self.model)
        except Exception as exc:  # noqa: BLE001 - a job's failure stays with the job
            self.fail(plan.job, exc)
            return None
        if plan.job.phase == "done" and plan.job in self.jobs:
            self.jobs.remove(plan.job)  # finished (its sink has the result)
        return plan

    def observe(self, plan: TrainPlan | None, seconds: float, inference_tokens: int) -> None:
        """Learn the cost of the step that just ran."""
        self.controller.observe(seconds, inference_tokens, plan.kind if plan else None, plan.units if plan else 0)


def _failure(job_id: str, code: str, message: str, param: str | None) -> TrainingEvent:
    return TrainingEvent(job_id, "failed", {"code": code, "message": message, "param": param})
