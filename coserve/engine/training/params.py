"""The trainable adapter of a fine-tuning job: float32 parameters per (layer, module), the update
each applies to the training rows of a projection, and its export as a PEFT directory.

Initialisation follows PEFT, seeded: LoRA A Kaiming-uniform and B zero (so training starts at the
base model), DoRA magnitudes ||W0||_row, RoAd theta 0 / alpha 1 (identity rotations), SHiRA values
zero on a random mask of r * (in + out) entries.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from safetensors.torch import save
from torch import nn

from coserve.adapters import road
from coserve.adapters.types import TARGET_MODULES, BaseModelShape, module_path
from coserve.engine.training.token_gate import TokenGate, lora_gated, update_ratio

PEFT_TYPES = ("LORA", "ROAD", "SHIRA")
PEFT_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector",
               "road_theta": "road_theta", "road_alpha": "road_alpha", "shira_weight": "shira_weight",
               "indices": "shira_indices"}  # our attribute -> PEFT's tensor suffix


@dataclass(frozen=True)
class AdapterSpec:
    """What a job trains (the API's `adapter` block, validated by the server)."""

    peft_type: str = "LORA"  # LORA | ROAD | SHIRA
    r: int = 8  # LoRA rank; SHiRA: r * (in + out) trainable entries per module
    lora_alpha: float = 16.0
    use_dora: bool = False
    use_rslora: bool = False
    variant: str = "road_1"  # RoAd: road_1 | road_2 | road_4
    group_size: int = 64  # RoAd rotation group size
    target_modules: tuple[str, ...] = TARGET_MODULES
    target_sparsity: float | None = None  # TS-PEFT: share of token updates to skip (None: dense)
    target_parts: tuple[str, ...] | None = None  # "layer:module" keys; overrides target_modules ("auto")
    shared_threshold: bool = True  # TS-PEFT: one tau over every module (see token_gate), else one per module

    @property
    def method(self) -> str:
        return "DORA" if self.peft_type == "LORA" and self.use_dora else self.peft_type

    def trains(self, layer: int, module: str) -> bool:
        if self.target_parts is not None:
            return f"{layer}:{module}" in self.target_parts
        return module in self.target_modules


def parameter_count(spec: AdapterSpec, out_f: int, in_f: int) -> int:
    """Trainable parameters of one (layer, module) of shape [out_f, in_f] under `spec`."""
    if spec.peft_type == "LORA":
        return spec.r * (in_f + out_f) + (out_f if spec.use_dora else 0)
    if spec.peft_type == "ROAD":
        return 2 * int(out_f * road._SIZE_FACTOR[spec.variant])
    return min(spec.r * (in_f + out_f), in_f * out_f)


def _split(key: str) -> tuple[int, str]:
    layer, module = key.split(":")
    return int(layer), module


def _peft_prefix(layer: int, module: str) -> str:
    return f"base_model.model.{module_path(layer, module)}"


def skipped_shares(counts: dict[str, tuple[int, int]]) -> dict[str, float]:
    """(gated, kept) per "layer:module" -> the share skipped per module name (over layers) and "overall"."""
    by_module: dict[str, list[int]] = {}
    for key, (seen, kept) in counts.items():
        totals = by_module.setdefault(_split(key)[1], [0, 0])
        totals[0] += seen
        totals[1] += kept
    shares = {m: 1 - kept / seen for m, (seen, kept) in by_module.items() if seen}
    seen_all = sum(t[0] for t in by_module.values())
    if seen_all:
        shares["overall"] = 1 - sum(t[1] for t in by_module.values()) / seen_all
    return shares


class TrainableModule(nn.Module):
    """One (layer, module)'s trainable tensors; `apply` adds its update to the training rows."""

    def __init__(self, spec: AdapterSpec, out_f: int, in_f: int, base_weight: torch.Tensor,
                 generator: torch.Generator, gate: TokenGate | None = None):
        super().__init__()
        self.spec, self.out_f, self.in_f = spec, out_f, in_f
        if spec.peft_type == "LORA":
            a = torch.empty(spec.r, in_f)
            bound = 1 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / PEFT
            self.lora_A = nn.Parameter(a.uniform_(-bound, bound, generator=generator))
            self.lora_B = nn.Parameter(torch.zeros(out_f, spec.r))
            self.scale = spec.lora_alpha / (math.sqrt(spec.r) if spec.use_rslora else spec.r)
            if spec.use_dora:
                self.magnitude = nn.Parameter(base_weight.float().norm(dim=1))
        elif spec.peft_type == "ROAD":
            if out_f % spec.group_size:
                raise ValueError(f"group_size {spec.group_size} does not divide {out_f} outputs")
            size = int(out_f * road._SIZE_FACTOR[spec.variant])
            self.road_theta = nn.Parameter(torch.zeros(size))
            self.road_alpha = nn.Parameter(torch.ones(size))
        elif spec.peft_type == "SHIRA":
            k = min(spec.r * (in_f + out_f), in_f * out_f)
            flat = torch.randperm(in_f * out_f, generator=generator)[:k]
            self.register_buffer("indices", torch.stack([flat // in_f, flat % in_f]))  # [2, K]
            self.shira_weight = nn.Parameter(torch.zeros(k))
        else:
            raise ValueError(f"peft_type must be one of {PEFT_TYPES}")
        if gate is None and spec.target_sparsity is not None:
            gate = TokenGate(spec.target_sparsity)
        self.gate = gate  # TS-PEFT threshold (possibly shared with the other modules)
        self.seen = self.kept = 0  # token updates gated / applied since the last optimizer step

    @property
    def plain_lora(self) -> bool:
        """LoRA without DoRA or a token gate: y + s B A x, which coforward fuses across a packed linear."""
        return self.spec.peft_type == "LORA" and not self.spec.use_dora and self.gate is None

    def apply(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None,
              weight_fn) -> torch.Tensor:
        """x [T, in] -> this module's output rows y [T, out] (base output, bias included) with the update,
        gated per token when the job is token-selective (see token_gate)."""
        gate = self.gate
        if gate is None:
            return self._dense(x, y, bias, weight_fn)
        if self.spec.peft_type == "LORA" and not self.spec.use_dora:  # expand + backward on kept rows only
            out, kept, ratios = lora_gated(x, y, self.lora_A, self.lora_B, self.scale, gate.threshold)
        else:
            update = self._dense(x, y, bias, weight_fn) - y  # [T, out]
            ratios = update_ratio(update.detach(), y.detach())
            kept = ratios >= gate.threshold(ratios)
            out = y + kept.to(update.dtype)[:, None] * update
        if torch.is_grad_enabled():
            gate.observe(ratios)
            self.seen += kept.numel()
            self.kept += int(kept.sum())
        return out

    def _dense(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, weight_fn) -> torch.Tensor:
        """weight_fn() gives the served base weight [out, in] float32 (DoRA's column norm only)."""
        kind = self.spec.peft_type
        if kind == "LORA":
            delta = (x.float() @ self.lora_A.T) @ self.lora_B.T * self.scale  # [T, out]
            if not self.spec.use_dora:
                return y + delta.to(y.dtype)
            b = bias.float() if bias is not None else 0.0
            with torch.no_grad():  # PEFT detaches the norm (DoRA paper, section 4.3)
                norm = (weight_fn() + self.scale * (self.lora_B @ self.lora_A)).norm(dim=1)
            gain = self.magnitude / norm  # [out]
            return ((y.float() - b + delta) * gain + b).to(y.dtype)
        if kind == "ROAD":
            c1, c2, partner = road.rotation_tables(
                *road.columns(self.spec.variant, self.spec.group_size, self.road_theta, self.road_alpha),
                self.spec.group_size)
            yf = y.float()
            return (yf * c1 + yf[:, partner] * c2).to(y.dtype)
        sparse = torch.sparse_coo_tensor(self.indices, self.shira_weight, (self.out_f, self.in_f))
        return y + torch.sparse.mm(sparse, x.float().T).T.to(y.dtype)  # S x


class TrainableAdapter(nn.Module):
    """Every (layer, module) a job trains; keys are "layer:module" (nn.ModuleDict keys may not hold dots)."""

    def __init__(self, spec: AdapterSpec, shape: BaseModelShape, base_weights, seed: int):
        super().__init__()
        self.spec, self.shape = spec, shape
        generator = torch.Generator().manual_seed(seed)
        shared = TokenGate(spec.target_sparsity) if spec.shared_threshold and spec.target_sparsity else None
        self.parts = nn.ModuleDict()
        for layer in range(shape.num_layers):
            for module in TARGET_MODULES:
                if spec.trains(layer, module):
                    out_f, in_f = shape.module_shapes[module]
                    weight = base_weights(layer, module) if spec.use_dora else None
                    self.parts[f"{layer}:{module}"] = TrainableModule(spec, out_f, in_f, weight, generator, shared)
        if not self.parts:
            raise ValueError("the adapter spec selects no module of the base model")

    @property
    def recomputable(self) -> bool:
        """Whether a layer's forward may be re-run at backward time: every forward of a token-selective module
        counts its gated tokens and may move an unset threshold, so those keep their forward's graph."""
        return all(part.gate is None for part in self.parts.values())

    def module(self, layer: int, module: str) -> TrainableModule | None:
        return self.parts[f"{layer}:{module}"] if f"{layer}:{module}" in self.parts else None

    def live_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT tensor name -> the live parameter or buffer (for loading into, and reading gradients)."""
        out = {}
        for key, part in self.parts.items():
            layer, module = key.split(":")
            prefix = _peft_prefix(int(layer), module)
            own = dict(part.named_parameters()) | dict(part.named_buffers())
            out.update({f"{prefix}.{PEFT_SUFFIX[n]}": t for n, t in own.items()})
        return out

    def named_peft_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter as PEFT names -> tensors (detached copies)."""
        return {k: v.detach().clone().contiguous() for k, v in self.live_tensors().items()}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set every trained tensor from PEFT-named tensors (resume, or continue an adapter)."""
        tensors = {k.removesuffix(".weight") if k.endswith("lora_magnitude_vector.weight") else k: v
                   for k, v in tensors.items()}  # PEFT writes the magnitude both ways
        ours = self.live_tensors()
        missing = sorted(set(ours) - set(tensors))
        if missing:
            raise ValueError(f"tensor {missing[0]} is missing (the adapter does not match the job's adapter spec)")
        stray = sorted(set(tensors) - set(ours))
        if stray:
            raise ValueError(f"tensor {stray[0]} is not trained by this job's adapter spec")
        with torch.no_grad():
            for name, target in ours.items():
                source = tensors[name]
                if source.shape != target.shape:
                    raise ValueError(f"tensor {name} has shape {tuple(source.shape)}; expected {tuple(target.shape)}")
                target.copy_(source.to(target.dtype))

    def peft_config(self, base_model: str) -> dict:
        s = self.spec
        targets = [module_path(*_split(key)) for key in self.parts] if s.target_parts is not None \
            else sorted(s.target_modules)  # PEFT matches full module paths as suffixes of its names
        config = {"peft_type": s.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                  "target_modules": targets, "inference_mode": True}
        if s.peft_type == "LORA":
            config.update(r=s.r, lora_alpha=s.lora_alpha, lora_dropout=0.0, bias="none", use_dora=s.use_dora,
                          use_rslora=s.use_rslora)
        elif s.peft_type == "ROAD":
            config.update(variant=s.variant, group_size=s.group_size)
        else:
            config.update(r=s.r, mask_type="random")
        if s.target_sparsity is not None:  # plain peft ignores this key (with a warning); coserve serves the gate
            config["coserve_token_selection"] = {"target_sparsity": s.target_sparsity, "thresholds": self.thresholds(),
                                                 "threshold": "shared" if s.shared_threshold else "per_module"}
        return config

    def thresholds(self) -> dict[str, float]:
        """Module path (as in PEFT's tensor names, without base_model.model.) -> tau."""
        return {module_path(*_split(key)): part.gate.tau or 0.0
                for key, part in self.parts.items() if part.gate is not None}

    def set_thresholds(self, thresholds: dict[str, float]) -> None:
        for key, part in self.parts.items():
            path = module_path(*_split(key))
            if part.gate is not None and path in thresholds:
                part.gate.tau = thresholds[path]

    def gate_step(self) -> dict[str, tuple[int, int]]:
        """After an optimizer step: (token updates gated, kept) per "layer:module" since the last step;
        every threshold moves (a shared one once)."""
        counts = {}
        for key, part in self.parts.items():
            if part.gate is not None and part.seen:
                counts[key] = (part.seen, part.kept)
                part.seen = part.kept = 0
        for gate in {id(p.gate): p.gate for p in self.parts.values() if p.gate is not None}.values():
            gate.step()
        return counts

    def parameter_counts(self) -> dict[str, int]:
        """"layer:module" -> its trainable parameters."""
        return {key: sum(p.numel() for p in part.parameters()) for key, part in self.parts.items()}

    def peft_files(self, base_model: str) -> tuple[bytes, bytes]:
        """(adapter_config.json, adapter_model.safetensors) of the current weights."""
        return json.dumps(self.peft_config(base_model)).encode(), save(self.named_peft_tensors())
