"""Adapter residency: known sources -> host cache (LRU, loaded in the background) -> device slots.

The host tier holds validated adapters (`--max-cpu-loras`); the device tier is `--max-loras`
slots in the model's stacked buffers. A slot in use by a running sequence is never evicted;
pinned adapters keep their slot. Loads run on a worker thread so a request whose adapter is
not resident waits without stalling the engine's other work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from coserve.adapters.types import LoadedAdapter
from coserve.kernels.threads import use_one_torch_thread

log = logging.getLogger("coserve.adapters")

AdapterSource = Callable[[], LoadedAdapter]  # loads and validates one adapter


@dataclass
class LoadTiming:
    adapter: str
    tier: str  # "host" (source -> host cache) or "device" (host -> slot)
    seconds: float


class HostCache:
    """Validated adapters in memory, least recently used first out; loads run on one worker thread."""

    def __init__(self, capacity: int, on_timing: Callable[[LoadTiming], None] | None = None):
        self.capacity = max(1, capacity)
        self.sources: dict[str, AdapterSource] = {}
        self._cache: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self.failed: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coserve-adapter-load",
                                        initializer=use_one_torch_thread)  # see kernels/threads.py
        self.on_timing = on_timing

    def register(self, name: str, source: AdapterSource, preload: LoadedAdapter | None = None) -> None:
        with self._lock:
            self.sources[name] = source
            self.failed.pop(name, None)
            self._cache.pop(name, None)
            if preload is not None:
                self._put(name, preload)

    def forget(self, name: str) -> None:
        """Drop `name` entirely (a retired revision): its source, cached copy and any failure."""
        with self._lock:
            self.sources.pop(name, None)
            self._cache.pop(name, None)
            self.failed.pop(name, None)

    def known(self, name: str) -> bool:
        return name in self.sources

    def names(self) -> list[str]:
        return sorted(self.sources)

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def ready(self, name: str) -> bool:
        with self._lock:
            return name in self._cache

    def get(self, name: str) -> LoadedAdapter:
        with self._lock:
            adapter = self._cache[name]
            self._cache.move_to_end(name)
            return adapter

    def prefetch(self, name: str) -> None:
        """Start loading `name` in the background unless it is cached, loading or unknown."""
        with self._lock:
            if name in self._cache or name in self._loading or name not in self.sources or name in self.failed:
                return
            self._loading[name] = self._pool.submit(self._load, name, self.sources[name])

    def _load(self, name: str, source: AdapterSource) -> None:
        start = time.perf_counter()
        try:
            adapter = source()
        except Exception as exc:  # noqa: BLE001 - reported to the waiting requests, never lost
            log.error("adapter %s failed to load: %s", name, exc)
            with self._lock:
                self.failed[name] = str(exc)
                self._loading.pop(name, None)
            return
        with self._lock:
            self._loading.pop(name, None)
            if self.sources.get(name) is source:
                self._put(name, adapter)
        if self.on_timing:
            self.on_timing(LoadTiming(name, "host", time.perf_counter() - start))

    def _put(self, name: str, adapter: LoadedAdapter) -> None:
        self._cache[name] = adapter
        self._cache.move_to_end(name)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SlotTable:
    """Device slots: which adapter holds which slot, how many running sequences use it, pins, LRU."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.slot_of: dict[str, int] = {}
        self.users = [0] * num_slots
        self.pinned: set[str] = set()
        self._lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_slots))

    def _victim(self) -> int | None:
        holder = {slot: name for name, slot in self.slot_of.items()}
        for slot in self._lru:  # oldest first
            name = holder.get(slot)
            if name is None or (self.users[slot] == 0 and name not in self.pinned):
                return slot
        return None

    def has_room_for(self, name: str) -> bool:
        return name in self.slot_of or self._victim() is not None

    def acquire(self, name: str) -> tuple[int, bool]:
        """Slot for `name` (evicting an idle one if needed) and whether its weights must be loaded."""
        fresh = name not in self.slot_of
        if fresh:
            slot = self._victim()
            if slot is None:
                raise RuntimeError("no adapter slot is free (check has_room_for first)")
            for other, s in list(self.slot_of.items()):
                if s == slot:
                    del self.slot_of[other]
            self.slot_of[name] = slot
        slot = self.slot_of[name]
        self.users[slot] += 1
        self._lru.move_to_end(slot)
        return slot, fresh

    def release(self, name: str) -> None:
        slot = self.slot_of.get(name)
        if slot is not None and self.users[slot] > 0:
            self.users[slot] -= 1

    def evict(self, name: str) -> None:
        """Free `name`'s slot (a deleted or replaced adapter); only when no running sequence uses it."""
        slot = self.slot_of.get(name)
        if slot is None:
            return
        if self.users[slot]:
            raise RuntimeError(f"adapter {name} is in use by {self.users[slot]} running sequences")
        del self.slot_of[name]
        self._lru.move_to_end(slot, last=False)

    def resident(self) -> list[str]:
        return sorted(self.slot_of)
