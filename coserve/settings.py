"""All settings of `coserve serve`: CLI flags > COSERVE_* environment > YAML file (--config) > defaults.

One pydantic-settings object; `engine_config()` and `server_config()` cut it into
the frozen per-component dataclasses the components take.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

if TYPE_CHECKING:  # the engine (and torch) load only when a server starts, so client commands start fast
    from coserve.engine.engine import EngineConfig

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(value: Any) -> int:
    """'512MiB', '2GB', '1e6' or a plain integer -> bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (examples: 512MiB, 2GiB, 1000000)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    served_model_name: str
    max_queued_requests: int
    shutdown_timeout: float
    max_n: int
    max_stop_sequences: int
    max_stop_length: int
    max_top_logprobs: int
    max_body_bytes: int
    max_upload_bytes: int = 256 * 2**20  # cap on an adapter upload (and on an archive's unpacked size)
    rate_limit_rps: float = 0.0  # requests a second per tenant (0: no limit)
    rate_limit_burst: int = 20
    fine_tuning: bool = True  # this replica takes fine-tuning jobs from the queue
    job_claim_idle_s: float = 60.0  # a job whose replica is silent this long is taken over
    job_max_deliveries: int = 3  # deliveries of one job before it fails
    train_microbatch_tokens: int = 1024  # training tokens forwarded before each backward pass


class ServeSettings(BaseSettings):
    """Every field is a `coserve serve --flag`, a COSERVE_FLAG variable, or a key of the YAML file."""

    model_config = SettingsConfigDict(env_prefix="COSERVE_", extra="forbid", yaml_file=None)

    model: str | None = Field(None, description="Hugging Face checkpoint directory (default: demo-small in data-dir)")
    served_model_name: str | None = Field(None, description="model id clients use (default: the directory's name)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    quantize: Literal["none", "int8", "int4"] = Field("none", description="weight-only quantization of the base")
    int4_group_size: Literal[32, 64, 128] = Field(128, description="int4 group size")
    prepack_weights: bool = Field(True, description="run 16-bit linears from oneDNN-packed weights (CPU)")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="compute dtype")
    data_dir: Path = Field(Path("data"), description="where the demo model and local state live")
    max_model_len: int | None = Field(None, ge=16, description="context window (default: the model's, <= 8192)")
    max_num_seqs: int = Field(64, ge=1, description="sequences running at once")
    max_batch_tokens: int = Field(512, ge=16, description="tokens computed per engine step (bounds prefill stalls)")
    kv_cache_memory: int = Field(512 * 2**20, description="bytes for the paged KV cache (e.g. 512MiB, 2GiB)")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    enable_prefix_caching: bool = Field(True, description="share KV blocks of identical prompt prefixes")
    max_queued_requests: int = Field(256, ge=0, description="waiting requests beyond which new ones get 503")
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests get to finish on SIGTERM")
    max_n: int = Field(16, ge=1, description="cap on n")
    max_stop_sequences: int = Field(8, ge=0, description="cap on the number of stop strings")
    max_stop_length: int = Field(256, ge=1, description="cap on one stop string's length")
    max_top_logprobs: int = Field(20, ge=0, description="cap on logprobs / top_logprobs")
    max_body_bytes: int = Field(4 * 2**20, description="cap on a request body (413 beyond)")
    seed: int = Field(0, description="seed of the shared sampler for unseeded requests")
    torch_threads: int = Field(0, ge=0, description="intra-op threads for the engine (0: torch's default)")
    adapter: list[str] = Field(default_factory=list, description="NAME=PATH of a PEFT adapter to serve (repeatable)")
    max_loras: int = Field(8, ge=1, description="adapter slots on the device (adapters in one batch)")
    max_cpu_loras: int = Field(32, ge=1, description="validated adapters kept in host memory")
    max_lora_rank: int = Field(16, ge=1, le=512, description="highest LoRA rank accepted")
    redis_url: str | None = Field(None, description="external Redis for the adapter store (default: a private "
                                  "redis-server under data-dir, AOF on)")
    store_prefix: str = Field("coserve", description="prefix of the store's Redis keys")
    api_keys_file: Path | None = Field(None, description="YAML/JSON file of API keys -> tenant and role (re-read "
                                       "when it changes)")
    api_keys: str | None = Field(None, description="KEY=TENANT[:ROLE],... (prefer the environment variable)")
    rate_limit_rps: float = Field(0.0, ge=0, description="requests a second per tenant (0: unlimited)")
    rate_limit_burst: int = Field(20, ge=1, description="requests a tenant may send at once above the rate")
    max_upload_bytes: int = Field(256 * 2**20, description="cap on an adapter upload and its unpacked archive")
    itl_slo_ms: float = Field(200.0, ge=0, description="inter-token latency target while fine-tuning co-runs: "
                              "training work per step is sized to keep decode steps under it (0: no bound)")
    fine_tuning: bool = Field(True, description="take fine-tuning jobs from the queue on this replica")
    job_claim_idle_s: float = Field(60.0, gt=0, description="seconds a job's replica may be silent before "
                                    "another replica takes the job over")
    job_max_deliveries: int = Field(3, ge=1, description="deliveries of one job (takeovers) before it fails")
    train_microbatch_tokens: int = Field(1024, ge=16, description="training tokens forwarded before each "
                                         "backward pass (bounds activation memory)")
    log_level: str = Field("info", description="debug | info | warning | error")

    @field_validator("kv_cache_memory", "max_body_bytes", "max_upload_bytes", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> int:
        return parse_size(value)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = cls.model_config.get("yaml_file")
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **flags: Any) -> ServeSettings:
        """Build settings from explicit flags (None = not given), the environment and a YAML file."""
        given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items() if v not in (None, ())}
        if config_file is None:
            return cls(**given)
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")
        scoped = type("ServeSettingsFromFile", (cls,), {
            "model_config": SettingsConfigDict(**{**cls.model_config, "yaml_file": str(config_file)}),
        })
        return scoped(**given)

    def adapter_specs(self) -> list[tuple[str, str]]:
        """--adapter NAME=PATH values as (name, path), names checked."""
        specs = []
        for spec in self.adapter:
            name, sep, path = spec.partition("=")
            if not sep or not path:
                raise ValueError(f"--adapter wants NAME=PATH, got {spec!r}")
            if not ADAPTER_NAME.match(name):
                raise ValueError(f"adapter name {name!r}: use 1-128 of A-Z a-z 0-9 . _ - : (starting with a letter "
                                 "or digit)")
            specs.append((name, path))
        return specs

    def engine_config(self, model_dir: str) -> EngineConfig:
        from coserve.engine.engine import EngineConfig

        return EngineConfig(
            model=model_dir,
            dtype=self.dtype,
            quantize=self.quantize,
            int4_group_size=self.int4_group_size,
            prepack_weights=self.prepack_weights,
            kv_cache_memory=self.kv_cache_memory,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_batch_tokens=self.max_batch_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed,
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=self.max_lora_rank,
            itl_slo_ms=self.itl_slo_ms or None,
        )

    def server_config(self, model_dir: str) -> ServerConfig:
        return ServerConfig(
            host=self.host,
            port=self.port,
            served_model_name=self.served_model_name or Path(model_dir).name,
            max_queued_requests=self.max_queued_requests,
            shutdown_timeout=self.shutdown_timeout,
            max_n=self.max_n,
            max_stop_sequences=self.max_stop_sequences,
            max_stop_length=self.max_stop_length,
            max_top_logprobs=self.max_top_logprobs,
            max_body_bytes=self.max_body_bytes,
            max_upload_bytes=self.max_upload_bytes,
            rate_limit_rps=self.rate_limit_rps,
            rate_limit_burst=self.rate_limit_burst,
            fine_tuning=self.fine_tuning,
            job_claim_idle_s=self.job_claim_idle_s,
            job_max_deliveries=self.job_max_deliveries,
            train_microbatch_tokens=self.train_microbatch_tokens,
        )
