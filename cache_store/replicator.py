"""Hot-block replication: a store copies the blocks it serves most often to a second store, so that
losing one store does not lose the hits of a hot prefix (a system prompt every request shares).

Counting. The PullBlocks handler reports the blocks each pull pinned (`pulled`). Full blocks only
are counted, in a bounded LRU of pull counts per block hash; request-scoped tail blocks are never
counted nor copied. When a block's count reaches `replicate_after_pulls`, it is queued together
with the other blocks of the same pull that are hot too, so a hot prefix's run travels as one
batch. A block is queued again no sooner than RECHECK_SECONDS later: that retries a failed copy and
makes a new one when the store holding the copy has gone.

Copying, in one background thread with a bounded queue (a full queue drops the run; it comes back
at its next re-check). For up to BATCH_BLOCKS queued blocks at a time: one index read says which
live stores hold each block; a block with fewer than COPIES live holders goes to the first store
after this one in the block's rendezvous order (pick_store's order, over the live stores that accept
the block's layout and fingerprint) that does not hold it yet. The blocks are pinned, read and
checked against the checksum they were stored with (a corrupt block is never copied), then pushed
with the workers' own push client (KVCacheClient.push), so the receiver checks them as any push
and indexes them as usual. The pushes carry REPLICATION_HEADER, which the receiver counts.
Nothing here ever fails a pull: a failure is logged and counted, and the re-check retries it.
"""

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cache_store.counters import LockedCounters
from cache_store.pool import StoredBlock, StorePool
from kvcluster.errors import Unavailable
from kvcluster.kv.blocks import checksum
from kvcluster.kv.index import RedisIndex, StoreRef, rendezvous_order
from kvcluster.rpc.cache_client import KVCacheClient
from kvcluster.rpc.security import SecuritySettings

log = logging.getLogger(__name__)

REPLICATION_HEADER = "x-kvcluster-replication"  # call metadata of a replica push
COPIES = 2                    # live holders a hot block is brought up to
MAX_TRACKED_BLOCKS = 65_536   # pull counts kept (least recently pulled forgotten first)
MAX_QUEUED_RUNS = 256         # hot runs waiting for the copier
BATCH_BLOCKS = 32             # blocks copied together: bounds the host memory of one batch
RECHECK_SECONDS = 10.0        # a hot block is looked at again (and a failed copy retried) after this


@dataclass
class ReplicationCounters(LockedCounters):
    """Blocks this store copied out, took in, or failed to copy; read by cache_store.metrics."""

    sent_blocks: int = 0
    received_blocks: int = 0
    failed_blocks: int = 0


@dataclass(slots=True)
class _Heat:
    pulls: int = 0
    next_check: float = 0.0


class HotReplicator:
    """Counts pulls per block and copies hot blocks to the next store (see the module docstring).
    Off when `after_pulls` is 0 or the store publishes no index; it still counts received copies."""

    def __init__(self, pool: StorePool, index: RedisIndex | None, store_id: Callable[[], str], after_pulls: int,
                 security: SecuritySettings = SecuritySettings(), timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.pool = pool
        self.index = index
        self.store_id = store_id
        self.after_pulls = after_pulls if index is not None else 0
        self.security = security
        self.timeout_s = timeout_s
        self.counters = ReplicationCounters()
        self._clock = clock
        self._lock = threading.Lock()
        self._heat: OrderedDict[bytes, _Heat] = OrderedDict()
        self._queue: queue.Queue[tuple[bytes, list[bytes]]] = queue.Queue(MAX_QUEUED_RUNS)
        self._pending = 0  # runs queued or being copied
        self._clients: dict[bytes, KVCacheClient] = {}
        self._owners = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hot-replicator", daemon=True)
        if self.after_pulls:
            self._thread.start()

    # ---- fed by the handlers ----------------------------------------------------------------

    def pulled(self, fingerprint: bytes, blocks: Sequence[StoredBlock]) -> None:
        """A pull pinned `blocks`: count them, and queue those that became hot."""
        if not self.after_pulls:
            return
        hot = self._count(blocks)
        if not hot:
            return
        with self._lock:
            self._pending += 1
        try:
            self._queue.put_nowait((fingerprint, hot))
        except queue.Full:
            self._done(1)
            self.counters.add(failed_blocks=len(hot))
            log.debug("replication queue full: %d hot blocks wait for their re-check", len(hot))

    def received(self, context, num_stored: int) -> None:
        """A push stored `num_stored` blocks; count them if it was another store's replica push."""
        if num_stored and any(item.key == REPLICATION_HEADER for item in context.invocation_metadata()):
            self.counters.add(received_blocks=num_stored)

    def idle(self) -> bool:
        """Nothing queued or being copied (tests wait for it)."""
        with self._lock:
            return self._pending == 0

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout_s)
        for client in self._clients.values():
            client.close()

    def _count(self, blocks: Sequence[StoredBlock]) -> list[bytes]:
        now, hot = self._clock(), []
        with self._lock:
            for block in blocks:
                if not isinstance(block.key, bytes):  # a request-scoped tail block
                    continue
                heat = self._heat.pop(block.key, None) or _Heat()
                self._heat[block.key] = heat
                heat.pulls += 1
                if heat.pulls >= self.after_pulls and now >= heat.next_check:
                    heat.next_check = now + RECHECK_SECONDS
                    hot.append(block.key)
            while len(self._heat) > MAX_TRACKED_BLOCKS:
                self._heat.popitem(last=False)
        return hot

    def _done(self, runs: int) -> None:
        with self._lock:
            self._pending -= runs

    # ---- the copier thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                runs = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while sum(len(hashes) for _, hashes in runs) < BATCH_BLOCKS:
                try:
                    runs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                for fingerprint, hashes in _by_fingerprint(runs).items():
                    self._replicate(fingerprint, hashes)
            except Exception:  # never let one bad batch end the thread
                log.exception("hot-block replication failed")
                self.counters.add(failed_blocks=sum(len(hashes) for _, hashes in runs))
            finally:
                self._done(len(runs))

    def _replicate(self, fingerprint: bytes, hashes: list[bytes]) -> None:
        cache = self._client(fingerprint)
        try:
            stores = cache.live_stores()
            holders = self.index.live_holders(hashes)
        except Unavailable as exc:
            log.warning("hot-block replication: index unavailable (%s)", exc)
            self.counters.add(failed_blocks=len(hashes))
            return
        targets = {h: target for h, held in zip(hashes, holders)
                   if (target := self._target(h, stores, held)) is not None}
        blocks = self._read(fingerprint, list(targets))
        if not blocks:
            return
        pushed = cache.push(blocks, place=lambda key, _: targets[key])
        sent = sum(1 for ref in pushed.refs if ref.store_address)
        self.counters.add(sent_blocks=sent, failed_blocks=len(pushed.refs) - sent)
        if sent < len(pushed.refs):
            log.warning("hot-block replication: %d of %d blocks not copied (%s); retried at their next re-check",
                        len(pushed.refs) - sent, len(pushed.refs), pushed.fallback)

    def _target(self, block_hash: bytes, stores: Sequence[StoreRef], held: set[str]) -> StoreRef | None:
        """The first store after this one in the block's rendezvous order that lacks it; None when the
        block already has COPIES live holders or no other store could take it."""
        if len(held) >= COPIES:
            return None
        order, me = rendezvous_order(block_hash, stores), self.store_id()
        mine = next((i for i, store in enumerate(order) if store.store_id == me), -1)
        after = order[mine + 1:] + order[:max(mine, 0)]
        return next((store for store in after if store.store_id not in held and store.store_id != me), None)

    def _read(self, fingerprint: bytes, keys: list[bytes]) -> list[tuple[bytes, list[int], bytes]]:
        """(hash, token ids, payload) of the `keys` still held, each checked against its stored checksum."""
        if not keys:
            return []
        owner = ("replicate", next(self._owners))
        try:
            pinned, _ = self.pool.pin(fingerprint, keys, owner)
            blocks = []
            for block, payload in zip(pinned, self.pool.read(pinned)):
                if checksum(payload) != block.header.checksum:  # the next pull discards it
                    self.counters.add(failed_blocks=1)
                    continue
                blocks.append((block.key, list(block.header.token_ids), payload))
            return blocks
        finally:
            self.pool.release(owner)

    def _client(self, fingerprint: bytes) -> KVCacheClient:
        client = self._clients.get(fingerprint)
        if client is None:
            client = self._clients[fingerprint] = KVCacheClient(
                self.index, self.pool.layout, fingerprint, self.timeout_s, security=self.security,
                metadata=((REPLICATION_HEADER, "1"),))
        return client


def _by_fingerprint(runs: Sequence[tuple[bytes, list[bytes]]]) -> dict[bytes, list[bytes]]:
    """The queued runs' hashes per fingerprint, in order, each once."""
    merged: dict[bytes, dict[bytes, None]] = {}
    for fingerprint, hashes in runs:
        merged.setdefault(fingerprint, {}).update(dict.fromkeys(hashes))
    return {fingerprint: list(hashes) for fingerprint, hashes in merged.items()}
