"""OpenAI-shaped request and response bodies (the only place API pydantic models live)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str, param: str | None = None, code: int | str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------- fine-tuning
class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v):
        if v != "auto" and not 1 <= v <= 100:
            raise ValueError("must be 'auto' or 1..100")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v):
        if v != "auto" and not 1 <= v <= 256:
            raise ValueError("must be 'auto' or 1..256")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, v):
        if v != "auto" and not 0 < v <= 100:
            raise ValueError("must be 'auto' or in (0, 100]")
        return v


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod = Field(default_factory=SupervisedMethod)


TRAINABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TokenSelection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_sparsity: float = Field(0.5, gt=0, lt=1, description="share of the adapter's token updates to skip")
    threshold: Literal["shared", "per_module"] = Field(
        "shared", description="shared: one tau over every module, so each module keeps the tokens whose relative "
        "update clears a common bar (its share is learned); per_module: every module skips target_sparsity")


class AdapterBlock(BaseModel):
    """coserve's extension: which adapter to train (PEFT names and defaults)."""

    model_config = ConfigDict(extra="forbid")

    peft_type: Literal["LORA", "ROAD", "SHIRA"] = "LORA"
    r: int = Field(8, ge=1, le=512)
    lora_alpha: float = Field(16.0, gt=0)
    use_dora: bool = False
    use_rslora: bool = False
    variant: Literal["road_1", "road_2", "road_4"] = "road_1"
    group_size: int = Field(64, ge=2)
    target_modules: list[str] | str = "all-linear"
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(10, ge=1, description="optimizer steps between checkpoints")
    token_selection: TokenSelection | None = None  # TS-PEFT: gate token updates per module
    parameter_budget: int | None = Field(None, ge=1, description="target_modules 'auto': trainable parameters")
    probe_steps: int = Field(10, ge=2, le=1000, description="target_modules 'auto': optimizer steps of the probe")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if v in ("all-linear", "auto"):
            return v
        if isinstance(v, str) or not v or any(m not in TRAINABLE_MODULES for m in v):
            raise ValueError(f"must be 'all-linear', 'auto' or a non-empty list of {list(TRAINABLE_MODULES)}")
        return sorted(set(v), key=TRAINABLE_MODULES.index)


class FineTuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9_.-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # the older top-level form
    adapter: AdapterBlock = Field(default_factory=AdapterBlock)
    integrations: list[Any] | None = None

    def resolved_hyperparameters(self) -> Hyperparameters:
        if self.method is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()
