"""A fine-tuning job's resumable state as one safetensors blob (no pickle): adapter tensors, AdamW
moments, and a JSON header with the step, data position, lr schedule, RNG state and loss so far."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load, save


@dataclass
class Progress:
    """Where a job stands; everything needed to continue the same run."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    cursor: int = 0  # samples of this epoch already trained
    trained_tokens: int = 0  # training tokens forwarded (all epochs)
    last_loss: float | None = None  # train loss of the last optimizer step
    thresholds: dict[str, float] | None = None  # TS-PEFT: tau per module path


def dump(progress: Progress, adapter_tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, rng: torch.Generator) -> bytes:
    tensors = {f"adapter/{k}": v.contiguous() for k, v in adapter_tensors.items()}
    opt = optimizer.state_dict()
    scalars = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"optim/{index}/{key}"] = value.contiguous()
            else:
                scalars[f"{index}/{key}"] = float(value)
    tensors["rng"] = rng.get_state()
    header = {"progress": asdict(progress), "optim_scalars": scalars, "param_groups": opt["param_groups"],
              "scheduler": scheduler.state_dict()}
    return save(tensors, metadata={"coserve_checkpoint": json.dumps(header)})


def restore(blob: bytes, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
            rng: torch.Generator) -> tuple[Progress, dict[str, torch.Tensor]]:
    """Load the optimizer, schedule and RNG in place; returns the progress and the adapter tensors."""
    tensors = load(blob)
    header = json.loads(_metadata(blob)["coserve_checkpoint"])
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in header["optim_scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    scheduler.load_state_dict(header["scheduler"])
    rng.set_state(tensors["rng"])
    adapter = {k.removeprefix("adapter/"): v for k, v in tensors.items() if k.startswith("adapter/")}
    return Progress(**header["progress"]), adapter


def _metadata(blob: bytes) -> dict[str, str]:
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]).get("__metadata__", {})
