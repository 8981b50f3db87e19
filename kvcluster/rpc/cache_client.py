"""The shared KV cache as a worker sees it: one Redis lookup, pulls from holders, pushes to shards.

Used by prefill and decode. Nothing here raises on a cache failure: every shortfall comes back as
a `fallback` reason ("redis_unavailable", "store_unavailable", "short_pull", "checksum_mismatch",
"token_mismatch", "push_failed") and the caller recomputes what it did not get.
"""

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from kvcluster.errors import IncompatibleStores, IntegrityError, Unavailable
from kvcluster.kv.blocks import BlockHash, Fingerprint
from kvcluster.kv.index import RedisIndex, StoreRef, group_runs, pick_store
from kvcluster.kv.membership import Membership
from kvcluster.kv.pool import KVLayout
from kvcluster.kv.wire import block_key
from kvcluster.proto import cache_pb2, common_pb2
from kvcluster.rpc.security import SecuritySettings
from kvcluster.rpc.store_client import StoreClient, make_ref

log = logging.getLogger(__name__)
LIVE_STORES_TTL_S = 2.0  # how long a live-store list is reused for placing pushes
REROUTED = frozenset({"store_unavailable", "short_pull"})  # pull failures another holder may make good


@dataclass
class Fetched:
    """Block payloads obtained from the cache, in prompt order, and how it went."""

    payloads: list[bytes] = field(default_factory=list)
    holders: list[StoreRef] = field(default_factory=list)
    lookup_s: float = 0.0
    pull_s: float = 0.0
    bytes_pulled: int = 0
    fallback: str | None = None


@dataclass
class Pushed:
    refs: list[common_pb2.BlockRef]  # per block, in order; store_address is empty where the push failed
    bytes_pushed: int = 0
    push_s: float = 0.0
    fallback: str | None = None


class KVCacheClient:
    """Index + store clients for one (fingerprint, layout). Thread-safe."""

    def __init__(self, index: RedisIndex | None, layout: KVLayout, fingerprint: Fingerprint, timeout_s: float = 10.0,
                 security: SecuritySettings = SecuritySettings(),
                 metadata: Sequence[tuple[str, str]] = ()):
        """`metadata`: more call metadata for every store call, after the security settings' own
        (a store's replicator marks its pushes so that the receiver counts them)."""
        self.index = index
        self.metadata = tuple(metadata)
        self.security = security
        self.layout = layout
        self.fingerprint = fingerprint
        self.timeout_s = timeout_s
        self._stores: dict[str, StoreClient] = {}
        self._lock = threading.Lock()
        self._skipped: set[str] = set()  # stores of another layout, logged once each
        self.membership = (Membership(index, self._usable, max_age_s=LIVE_STORES_TTL_S) if index is not None
                           else None)  # the live stores holding this worker's layout, for placing pushes

    def close(self) -> None:
        with self._lock:
            for client in self._stores.values():
                client.close()
            self._stores.clear()

    def store(self, address: str) -> StoreClient:
        with self._lock:
            client = self._stores.get(address)
            if client is None:
                client = self._stores[address] = StoreClient(address, self.layout, self.timeout_s,
                                                             self.security.channel_credentials(),
                                                             self.security.outgoing_metadata() + self.metadata)
            return client

    # ---- reading --------------------------------------------------------------------------

    def lookup(self, hashes: Sequence[BlockHash]) -> tuple[list[StoreRef], float, str | None]:
        """Holders of the longest indexed prefix (one Redis round trip), its latency, and a fallback reason."""
        if self.index is None or not hashes:
            return [], 0.0, None
        start = time.perf_counter()
        try:
            return self.index.lookup(hashes), time.perf_counter() - start, None
        except Unavailable as exc:
            log.warning("index lookup failed: %s", exc)
            return [], time.perf_counter() - start, "redis_unavailable"

    def pull_held(self, hashes: Sequence[BlockHash], token_blocks: Sequence[Sequence[int]],
                  holders: Sequence[StoreRef], timeout_s: float | None = None) -> Fetched:
        """Pull the blocks a lookup found, from their holders."""
        return self.pull([common_pb2.BlockRef(block_hash=h, store_id=s.store_id, store_address=s.address,
                                              token_ids=token_blocks[i])
                          for i, (h, s) in enumerate(zip(hashes, holders))], timeout_s)

    def pull(self, refs: Sequence[common_pb2.BlockRef], timeout_s: float | None = None,
             reroute: bool = True) -> Fetched:
        """Pull `refs` in order from their holders, stopping at the first block not delivered intact.
        Each ref's token_ids are the tokens the caller expects; the block's header must match them.
        When a holder fails or runs short, the rest is pulled once more from other live holders
        (a hot block has two: cache_store.replicator); what neither delivers is left to recompute."""
        result = Fetched()
        start = time.perf_counter()
        holders = [StoreRef(r.store_id, r.store_address) for r in refs]
        for run in group_runs(holders):
            wanted = refs[run.start:run.end]
            reason = self._pull_run(run.store.address, wanted, result, timeout_s)
            if reason is None:
                result.holders.extend(holders[run.start:run.end])
                continue
            result.fallback = reason
            result.holders.extend(holders[run.start:len(result.payloads)])  # delivered before it failed
            rest = refs[len(result.payloads):]
            if reroute and reason in REROUTED and (moved := self._elsewhere(rest, run.store.store_id)):
                log.info("pulling %d blocks from other holders after %s from %s", len(moved), reason, run.store.address)
                spent = time.perf_counter() - start
                more = self.pull(moved, None if timeout_s is None else max(0.001, timeout_s - spent), reroute=False)
                result.payloads += more.payloads
                result.holders += more.holders
                result.bytes_pulled += more.bytes_pulled
                result.fallback = more.fallback or (reason if len(moved) < len(rest) else None)
            break
        result.pull_s = time.perf_counter() - start
        return result

    def _elsewhere(self, refs: Sequence[common_pb2.BlockRef], failed_store: str) -> list[common_pb2.BlockRef]:
        """`refs` (their leading full blocks) pointed at live holders other than `failed_store`, keeping
        runs on one store where it can; empty when the index cannot say (one extra round trip)."""
        hashes = list(itertools.takewhile(bool, (ref.block_hash for ref in refs)))
        try:
            held = self.index.live_holders(hashes) if self.index is not None and hashes else []
            stores = {store.store_id: store for store in self.live_stores()}
        except Unavailable:
            return []
        moved, previous = [], None
        for ref, holder_ids in zip(refs, held):
            usable = sorted((holder_ids - {failed_store}) & stores.keys())
            if not usable:
                break
            previous = previous if previous in usable else usable[0]
            moved.append(common_pb2.BlockRef(block_hash=ref.block_hash, store_id=previous,
                                             store_address=stores[previous].address, token_ids=ref.token_ids))
        return moved

    def _pull_run(self, address: str, wanted: Sequence[common_pb2.BlockRef], result: Fetched,
                  timeout_s: float | None) -> str | None:
        if not address:
            return "store_unavailable"
        keys = [block_key(r) for r in wanted]
        blocks = self.store(address).iter_blocks(self.fingerprint, keys, cache_pb2.PullSummary(), timeout_s=timeout_s)
        received = 0
        try:  # blocks delivered before a failure stay usable: the prefix they form is intact
            for (header, payload), ref in zip(blocks, wanted):
                if list(header.token_ids) != list(ref.token_ids):
                    return "token_mismatch"
                result.payloads.append(payload)
                result.bytes_pulled += len(payload)
                received += 1
        except IntegrityError as exc:
            log.warning("pull from %s: %s", address, exc)
            return "checksum_mismatch"
        except (Unavailable, grpc.RpcError) as exc:
            log.warning("pull from %s failed: %s", address, exc.code() if isinstance(exc, grpc.RpcError) else exc)
            return "store_unavailable"
        finally:
            blocks.close()  # ends the pull: releases the store's pins if it stopped early
        return None if received == len(wanted) else "short_pull"

    # ---- writing --------------------------------------------------------------------------

    def live_stores(self) -> list[StoreRef]:
        """Live stores that hold this worker's KV layout, re-read from the index at most every
        LIVE_STORES_TTL_S. Stores of another layout (another model or dtype) are never pushed to."""
        return [] if self.membership is None else [store for store, _ in self.membership.current()]

    def _usable(self, stores: list[StoreRef]) -> list[StoreRef]:
        """The stores that accept this worker's blocks; each other one is logged once."""
        ours = self.layout.canonical()
        usable = [s for s in stores if s.accepts(ours, self.fingerprint)]
        for store in stores:
            if store not in usable and store.store_id not in self._skipped:
                self._skipped.add(store.store_id)
                log.warning("skipping %s: this worker computes %s under fingerprint %s", store.describe(), ours,
                            self.fingerprint.hex())
        return usable

    def check_stores(self, wait_s: float) -> list[StoreRef]:
        """Start-up check: wait up to `wait_s` for a live store, then raise IncompatibleStores when
        stores are live but none holds this worker's layout and fingerprint (the cluster would
        cache nothing). Returns the stores this worker will use; logs the ones it will skip."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                stores = self.index.live_stores()
            except Unavailable as exc:
                log.warning("cannot check the cache stores' KV layout now (%s); caching starts once Redis answers", exc)
                return []
            if stores or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        ours = self.layout.canonical()
        usable = self._usable(stores)
        others = [s for s in stores if s not in usable]
        if others and not usable:
            raise IncompatibleStores(
                f"no live cache store in index namespace {self.index.ns!r} accepts this worker's KV: the worker "
                f"computes {ours} under fingerprint {self.fingerprint.hex()}, but "
                + "; ".join(s.describe() for s in others)
                + ". Start every service with the same --dtype / KVC_DTYPE (and model), or give this worker "
                "stores of its own layout.")
        if not stores:
            log.warning("no live cache store after %.0f s: caching starts when one registers", wait_s)
        else:
            log.info("cache stores holding this worker's KV layout %s: %s", ours,
                     ", ".join(s.store_id for s in usable))
        self.membership.keep([(store, {}) for store in usable])
        return usable

    def push(self, blocks: Sequence[tuple[bytes | str, Sequence[int], bytes]], lease_seconds: int = 0,
             place: Callable[[bytes, Sequence[StoreRef]], StoreRef] = pick_store) -> Pushed:
        """Push (hash or request key, token ids, payload) blocks, each to the store `place` chooses
        among the live ones (by default its rendezvous choice; a replica goes to the next one)."""
        start = time.perf_counter()
        result = Pushed([make_ref(payload, tokens, key if isinstance(key, bytes) else None,
                                  None if isinstance(key, bytes) else key) for key, tokens, payload in blocks])
        try:
            stores = self.live_stores()
        except Unavailable:
            result.fallback = "redis_unavailable"
            return result
        if not stores:
            result.fallback = "store_unavailable" if blocks else None
            return result
        by_store: dict[StoreRef, list[int]] = {}
        refs = result.refs
        for i, (key, _, _) in enumerate(blocks):
            by_store.setdefault(place(key if isinstance(key, bytes) else key.encode(), stores), []).append(i)
        for target, members in by_store.items():
            try:
                response = self.store(target.address).push_blocks(
                    self.fingerprint, [(refs[i], blocks[i][2]) for i in members], lease_seconds)
            except (grpc.RpcError, Unavailable) as exc:
                log.warning("push to %s failed: %s", target.address, exc)
                result.fallback = "push_failed"
                continue
            held = {block_key(o.block) for o in response.results if o.status in (o.STORED, o.DUPLICATE)}
            for i in members:
                if block_key(refs[i]) in held:
                    refs[i].store_id, refs[i].store_address = target.store_id, target.address
                    result.bytes_pushed += len(blocks[i][2])
                else:
                    result.fallback = "push_failed"
        result.push_s = time.perf_counter() - start
        return result

