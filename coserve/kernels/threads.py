"""Torch in threads other than the engine's: one core each.

Every OS thread that runs a parallel ATen op (an elementwise op over more than 32K elements, say)
gets an OpenMP team of its own, and those worker threads live as long as the thread does. Once the
process holds more OpenMP threads than cores, GNU OpenMP stops spinning between parallel regions
and parks its threads, so every small parallel op of the engine then pays a futex wake-up. Measured
here: one adapter-loader thread that had validated a SHiRA adapter (33.8K-value tensors) made the
engine's small ops 2-5x slower (a 64 x 960 copy: 4.3 -> 23 us) and base-model decode 560 -> 310
tok/s for the rest of the process's life.

`use_one_torch_thread()` at the start of such a thread (adapter loading, upload validation, job
bookkeeping) keeps its torch work on that thread alone. It sets this thread's OpenMP thread count
through the OpenMP runtime torch loaded, not `torch.set_num_threads`: that one also stores a
process-wide default which every thread created afterwards (the engine's among them) would inherit.
"""

from __future__ import annotations

import ctypes
import functools

import torch

_RUNTIMES = ("libgomp", "libiomp", "libomp")  # GNU, Intel, LLVM OpenMP: each exports omp_set_num_threads


@functools.lru_cache(maxsize=1)
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime mapped into this process (torch's own), or None without one (or off Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split()[-1] for line in maps if "/" in line]
    except OSError:
        return None
    path = next((p for p in paths if any(name in p.rsplit("/", 1)[-1] for name in _RUNTIMES)), None)
    return ctypes.CDLL(path) if path else None


def use_one_torch_thread() -> None:
    """Run this thread's parallel torch ops on this thread only (call it first in the thread)."""
    torch.get_num_threads()  # ATen sets each new thread's OpenMP count from the process default on first use
    runtime = _openmp_runtime()
    if runtime is not None:
        runtime.omp_set_num_threads(1)
