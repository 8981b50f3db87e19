"""Keeps a store's (or a worker's) Redis index entries in step with its pool, and its heartbeat alive.

Workers use it too (kvcluster.worker.registration): a decode worker's local prefix cache is its
pool, and `load` is published with every heartbeat so routers see running/waiting/free blocks.

The pool reports additions and evictions (under its lock, so in order) into a queue; one thread
applies them in batches, heartbeats every `heartbeat_s`, and runs the store's periodic
housekeeping (`on_tick`). Redis trouble never reaches the pool or a gRPC handler: index writes
are dropped while Redis is unreachable, and once it answers again the store registers afresh (new
epoch; older entries deleted) and republishes everything it holds. The same happens when its
heartbeat key was lost (Redis restarted empty, or the store stalled past its TTL).
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from itertools import groupby

from kvcluster.errors import Unavailable
from kvcluster.kv.index import RedisIndex

log = logging.getLogger(__name__)

_STOP = object()
MAX_OPS_PER_ROUND = 4096


class IndexPublisher:
    """An IndexSink that writes this store's entries to Redis from a background thread."""

    def __init__(self, index: RedisIndex | None, store_id: str, address: str, heartbeat_s: float,
                 ttl_s: float, held_hashes: Callable[[], list[bytes]],
                 on_tick: Callable[[], object] = lambda: None, layout: str = "", fingerprint: str = "",
                 dead_store_grace_s: float = 600.0, load: Callable[[], dict[str, int | str]] | None = None):
        self.index = index
        self.store_id = store_id
        self.address = address
        self.layout = layout            # published with the registration, so workers can check theirs
        self.fingerprint = fingerprint
        self.dead_store_grace_s = dead_store_grace_s
        self._next_collect = 0.0        # monotonic time of the next collection of dead stores
        self.collected: list[str] = []  # stores this publisher removed from the index
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self._held_hashes = held_hashes
        self._on_tick = on_tick
        self._load = load  # published into the registration on every tick
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"index-{store_id}", daemon=True)
        self.epoch = 0           # 0 = not registered
        self.errors = 0          # Redis failures seen (a metric)
        self._healthy = True     # log the first failure and the recovery, not every retry

    # ---- IndexSink (called under the pool lock: only enqueue) -----------------------------

    def blocks_added(self, block_hashes: list[bytes]) -> None:
        if self.index is not None:
            self._queue.put(("add", block_hashes))

    def blocks_removed(self, block_hashes: list[bytes]) -> None:
        if self.index is not None:
            self._queue.put(("remove", block_hashes))

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every change reported so far is applied. True if the index is up to date."""
        done = threading.Event()
        self._queue.put(("flush", done))
        return done.wait(timeout_s) and self.epoch != 0

    def stop(self, deregister: bool = True) -> None:
        """Stop the thread; with `deregister`, drop the heartbeat and this epoch's entries.
        Without it the entries stay until the heartbeat expires (what a crash looks like)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        if deregister and self.index is not None and self.epoch:
            try:
                self.index.deregister(self.store_id, self.epoch)
            except Unavailable as exc:
                log.warning("could not deregister %s from the index: %s", self.store_id, exc)
        self.epoch = 0
        if self.index is not None:
            self.index.close()

    # ---- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = 0.0
        while True:
            ops = self._next_ops(timeout_s=max(0.0, next_tick - time.monotonic()))
            if ops and ops[-1] is _STOP:
                return
            if time.monotonic() >= next_tick:
                ops = self._tick(ops)
                next_tick = time.monotonic() + self.heartbeat_s
            self._apply(ops)

    def _next_ops(self, timeout_s: float) -> list:
        try:
            ops = [self._queue.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while ops[-1] is not _STOP and len(ops) < MAX_OPS_PER_ROUND:
            try:
                ops.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return ops

    def _tick(self, ops: list) -> list:
        """Housekeeping and heartbeat. Returns the ops still to apply."""
        self._on_tick()
        if self.index is None:
            return ops
        try:
            if self.epoch and not self.index.heartbeat(self.store_id, self.epoch, self.ttl_s):
                log.warning("index heartbeat of %s was lost; registering again", self.store_id)
                self.epoch = 0
            ops = ops if self.epoch else self._register(ops)
            if self._load is not None:
                self.index.publish_load(self.store_id, self._load())
            self._collect_dead()
            return ops
        except Unavailable as exc:
            self._failed(exc)
            return ops

    def _collect_dead(self) -> None:
        """Every grace/4 (at least one heartbeat apart), remove stores dead for longer than the grace."""
        if time.monotonic() < self._next_collect:
            return
        self._next_collect = time.monotonic() + max(self.heartbeat_s, self.dead_store_grace_s / 4)
        for store_id in self.index.collect_dead_stores(self.dead_store_grace_s):
            log.info("removed dead store %s (no heartbeat for over %g s) from the index", store_id,
                     self.dead_store_grace_s)
            self.collected.append(store_id)

    def _register(self, ops: list) -> list:
        """New epoch, then clear the queue, then publish a snapshot of the pool: every change
        queued before the snapshot is already reflected in it. Returns the pending flushes."""
        epoch = self.index.register(self.store_id, self.address, self.ttl_s, self.layout, self.fingerprint)
        flushes = [op for op in [*ops, *self._drain()] if op[0] == "flush"]
        try:
            self.index.add_entries(self.store_id, epoch, self._held_hashes())
        except Unavailable:
            self._apply(flushes)  # a flush must not wait on a failed round
            raise
        self.epoch = epoch
        if not self._healthy:
            log.info("index writes of %s resumed", self.store_id)
        self._healthy = True
        log.info("%s registered in the index at %s, epoch %d", self.store_id, self.address, epoch)
        return flushes

    def _drain(self) -> list:
        """Everything queued now, except a stop request, which stays queued."""
        drained = []
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return drained
            if op is _STOP:
                self._queue.put(_STOP)
                return drained
            drained.append(op)

    def _apply(self, ops: list) -> None:
        try:
            for kind, group in groupby(ops, key=lambda op: op[0]):
                self._apply_group(kind, [payload for _, payload in group])
        except Unavailable as exc:
            self._failed(exc)
            for op in ops:  # never leave a flush waiting on a failed round
                if op[0] == "flush":
                    op[1].set()

    def _apply_group(self, kind: str, payloads: list) -> None:
        if kind == "flush":
            for done in payloads:
                done.set()
        elif self.epoch:  # unregistered: the republish after registering covers these
            hashes = [block_hash for batch in payloads for block_hash in batch]
            if kind == "add":
                self.index.add_entries(self.store_id, self.epoch, hashes)
            else:
                self.index.remove_entries(self.store_id, self.epoch, hashes)

    def _failed(self, exc: Unavailable) -> None:
        self.errors += 1
        if self._healthy:
            log.warning("index writes of %s paused, Redis unreachable: %s", self.store_id, exc)
        self._healthy = False
        self.epoch = 0
