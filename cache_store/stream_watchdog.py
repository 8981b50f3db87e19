"""Bounds on how long one streaming call may hold a server's handler thread.

A gRPC sync server runs each call on a pool thread. A client that stops reading a server stream
(or stops sending on a client stream) leaves that thread blocked in flow control, holding
whatever the call holds (a pull's pins), until the client's deadline, if it set one. The
watchdog cancels such calls from outside: one thread checks every registered call and cancels
it when it made no progress for `idle_s` or has run for `total_s`. Cancelling ends the call with
CANCELLED and runs its callbacks, so pins are released as on any client cancel.
"""

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


@dataclass
class _Watched:
    context: grpc.ServicerContext
    what: str
    started: float
    last_progress: float


class StreamWatchdog:
    """Cancels streaming calls that stall or run too long. Thread-safe; one checker thread."""

    def __init__(self, idle_s: float, total_s: float, clock: Callable[[], float] = time.monotonic):
        self.idle_s, self.total_s, self._clock = idle_s, total_s, clock
        self._calls: dict[int, _Watched] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.cancelled = 0  # calls this watchdog ended (a metric)
        self._thread = threading.Thread(target=self._run, name="stream-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, context: grpc.ServicerContext, what: str) -> Iterator[Callable[[], None]]:
        """Watch one call for the `with` body; call the yielded function after each unit of progress."""
        now = self._clock()
        key = next(self._ids)
        entry = _Watched(context, what, now, now)
        with self._lock:
            self._calls[key] = entry

        def progressed() -> None:
            entry.last_progress = self._clock()

        try:
            yield progressed
        finally:
            with self._lock:
                self._calls.pop(key, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> int:
        """Cancel every call past a limit now; how many were cancelled."""
        now = self._clock()
        with self._lock:
            expired = [(key, entry) for key, entry in self._calls.items()
                       if now - entry.last_progress > self.idle_s or now - entry.started > self.total_s]
            for key, _ in expired:
                del self._calls[key]
        for _, entry in expired:
            idle = now - entry.last_progress
            log.warning("cancelling %s from %s: idle %.1f s (limit %g), running %.1f s (limit %g)", entry.what,
                        entry.context.peer(), idle, self.idle_s, now - entry.started, self.total_s)
            entry.context.cancel()
        self.cancelled += len(expired)
        return len(expired)

    def _run(self) -> None:
        interval = max(0.05, min(self.idle_s, self.total_s) / 4)
        while not self._stop.wait(interval):
            self.check()
