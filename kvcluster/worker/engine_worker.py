"""EngineWorker: one thread owns an Engine (model + KV pool); other threads hand it work via a queue.

gRPC handler threads never touch the model or the pool: they submit closures that run on the
engine thread between steps, and subscribe to a request's token events. New requests therefore
join the running batch between decode steps (continuous batching).
"""

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

from kvcluster.engine.engine import Engine, Export
from kvcluster.engine.sequence import Sequence, TokenEvent
from kvcluster.errors import ResourceExhausted

T = TypeVar("T")
log = logging.getLogger(__name__)
_STOP = object()
_CANCELLED = object()  # ends a subscriber's stream when its request is cancelled from outside


class EngineWorker:
    """Drives an Engine on a dedicated thread."""

    def __init__(self, engine: Engine, max_waiting: int = 64, name: str = "engine",
                 on_step: Callable[[Engine], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # called on the engine thread after every step (metrics)
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._subscribers: dict[str, queue.SimpleQueue] = {}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._stopped = threading.Event()
        self._idle = threading.Event()  # set while the engine has no request to run
        self._idle_since = 0.0          # time.monotonic() when it was last set

    def start(self) -> "EngineWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._commands.put(_STOP)
        self._thread.join(timeout)

    def submit(self, fn: Callable[[Engine], T]) -> "Future[T]":
        """Run `fn(engine)` on the engine thread between steps."""
        future: Future[T] = Future()
        if self._stopped.is_set():
            future.set_exception(ResourceExhausted("engine is shutting down"))
        else:
            self._commands.put((fn, future))
        return future

    def call(self, fn: Callable[[Engine], T], timeout: float | None = None) -> T:
        return self.submit(fn).result(timeout)

    def read_export(self, export: Export) -> list[bytes]:
        """An export's block bytes, read on the calling thread (a pusher's); its pinned slots then go
        back to the pool on the engine thread."""
        try:
            return export.payloads()
        finally:
            self.unpin(export)

    def unpin(self, export: Export) -> None:
        """Hand a read export's pinned slots back to the pool (from any thread)."""
        if export.slots:
            self.submit(lambda engine: engine.unpin(export))

    def wait_idle(self, timeout: float, settle: float = 0.0) -> bool:
        """Block until the engine has had no request to run for `settle` seconds (background work's
        turn), at most `timeout` seconds; whether it is idle."""
        deadline = time.monotonic() + timeout
        while self._idle.wait(max(0.0, deadline - time.monotonic())):
            quiet = time.monotonic() - self._idle_since
            if quiet >= settle:
                return True
            if time.monotonic() + settle - quiet > deadline:
                return False
            time.sleep(settle - quiet)
        return False

    def stream(self, add: Callable[[Engine], Sequence]) -> Iterator[TokenEvent]:
        """Admit a sequence with `add(engine)` and yield its token events until it finishes.
        Closing the iterator early (client cancel) aborts the sequence and frees its blocks."""
        events: queue.SimpleQueue = queue.SimpleQueue()

        def admit(engine: Engine) -> tuple[Sequence, bool]:
            if len(engine.waiting) >= self.max_waiting:
                raise ResourceExhausted(f"{len(engine.waiting)} requests already waiting (max_waiting={self.max_waiting})")
            seq = add(engine)
            # Decided here, on the engine thread: once admit returns, the engine may step the
            # sequence to its end before this handler thread looks at it again.
            finished_at_admission = seq.finish_reason is not None
            if not finished_at_admission:
                self._subscribers[seq.request_id] = events
            return seq, finished_at_admission

        seq, finished = self.call(admit)
        try:
            yield from seq.initial_events
            while not finished:
                event = events.get()
                if event is _CANCELLED:
                    finished = True  # already dropped by cancel()
                    return
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel(seq.request_id)

    # ---- the engine thread ----------------------------------------------------------------

    def cancel(self, request_id: str) -> None:
        """Abort a request from any thread (client gone, deadline passed); its stream ends."""
        self.submit(lambda engine: self._drop(engine, request_id))

    def _drop(self, engine: Engine, request_id: str) -> None:
        subscriber = self._subscribers.pop(request_id, None)
        if subscriber is not None:
            subscriber.put(_CANCELLED)
        engine.abort(request_id)

    def _loop(self) -> None:
        stalled = False  # the last step could run nothing: progress now needs a command (a release)
        while not self._stopped.is_set():
            if not self.engine.has_work() and not self._idle.is_set():
                self._idle_since = time.monotonic()
                self._idle.set()
            self._run_commands(block=stalled or not self.engine.has_work())
            if self._stopped.is_set() or not self.engine.has_work():
                continue
            self._idle.clear()
            try:
                events = self.engine.step()
            except Exception as err:  # the engine's own bookkeeping broke (requests are isolated inside)
                log.exception("engine step failed")
                self._fail_all(err)
                continue
            stalled = self.engine.last_step[0] == "idle"
            if self.on_step is not None:
                self.on_step(self.engine)
            for request_id, error in self.engine.take_failures():  # failed alone; the batch went on
                subscriber = self._subscribers.pop(request_id, None)
                if subscriber is not None:
                    subscriber.put(error)
            for event in events:
                subscriber = self._subscribers.get(event.request_id)
                if subscriber is not None:
                    subscriber.put(event)
                    if event.finish_reason is not None:
                        del self._subscribers[event.request_id]
        self._fail_all(ResourceExhausted("engine stopped"))

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            if item is _STOP:
                return
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as err:
                    future.set_exception(err)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                item = None

    def _fail_all(self, err: BaseException) -> None:
        for request_id, subscriber in list(self._subscribers.items()):
            subscriber.put(err)
            self.engine.abort(request_id)
        self._subscribers.clear()
