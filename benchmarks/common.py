"""Helpers shared by the benchmark scripts: the demo checkpoint, machine facts, JSON output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from coserve.engine.demo import write_demo_model

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def demo_checkpoint(size: str = "small") -> Path:
    """benchmarks/results/demo-<size>, generated once (seeded; never committed)."""
    path = RESULTS / f"demo-{size}"
    if not (path / "model.safetensors").is_file():
        write_demo_model(size, path)
    return path


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    print(f"wrote {path}")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns]
    line = lambda values: "  ".join(f"{v!s:>{w}}" for v, w in zip(values, widths))
    return "\n".join([line(columns), line("-" * w for w in widths)] + [line(r.get(c, "") for c in columns)
                                                                       for r in rows])
