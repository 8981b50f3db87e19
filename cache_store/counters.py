"""Counters the store's threads add to and cache_store.metrics reads, as one locked set."""

import threading
from dataclasses import fields


class LockedCounters:
    """Base of a dataclass of numeric counters: `add` bumps several at once and `snapshot` reads
    them all, each under one lock, so a scrape never sees half of an update."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self)}
