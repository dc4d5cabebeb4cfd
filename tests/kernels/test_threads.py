"""Torch in helper threads stays on that thread: no OpenMP team of its own (see coserve/kernels/threads.py)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from coserve.kernels.threads import use_one_torch_thread

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                                reason="needs Linux and at least two torch threads")


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_work() -> int:
    """An op big enough for ATen to run it in parallel; returns this thread's torch thread count."""
    x = torch.randn(400_000)
    assert bool(torch.isfinite(x * 2).all())
    return torch.get_num_threads()


def test_a_helper_thread_runs_torch_on_itself_only():
    engine_threads = torch.get_num_threads()
    before = os_threads()
    with ThreadPoolExecutor(1, initializer=use_one_torch_thread) as pool:
        assert pool.submit(parallel_work).result() == 1
        assert os_threads() == before + 1  # the helper itself, and no OpenMP workers for it
        assert torch.get_num_threads() == engine_threads  # this thread (the engine's, here) keeps its count
    with ThreadPoolExecutor(1) as pool:  # threads started later still get the process default
        assert pool.submit(torch.get_num_threads).result() == engine_threads


def test_without_it_a_helper_thread_starts_an_openmp_team():
    """The failure mode the helper prevents (if this stops holding, the helper is no longer needed)."""
    before = os_threads()
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(parallel_work).result() == torch.get_num_threads()
        assert os_threads() > before + 1
