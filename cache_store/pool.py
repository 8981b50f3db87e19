"""The store's block pool: a preallocated KVPool tensor plus the bookkeeping that makes it a cache.

- Full blocks are keyed by chained hash and indexed; request-scoped blocks (a prompt's partial
  tail) are keyed by request key, never indexed, and live until pulled or until their lease ends.
- Unpinned full blocks sit in an LRU (an OrderedDict: O(1) touch, O(1) evict). A pull pins its
  blocks for an owner, which takes them out of the LRU; releasing the owner puts them back at the
  most-recently-used end, so "least recently pulled" is what gets evicted first.
- A block becomes visible only after its bytes are fully copied into its slot: a slot is reserved
  under the lock, filled outside it, then published under the lock.
- Each slot has a generation, bumped whenever the slot is handed out; a block records the
  generation it was written under, so a read can prove its slot still holds that block.
- Full and nothing evictable -> ResourceExhausted at once; nothing ever waits for space.
- Lower tiers (cache_store.spill: host memory, then a disk file; none by default): a full block
  evicted from the device goes down one tier instead of being dropped, a tier's own LRU victim goes
  down the next, and only what leaves the last tier is dropped. A block lives in exactly one tier;
  while its bytes move between tiers it is "moving": held, and a pull that reaches it waits for it
  to land (at most MOVE_WAIT_S), so concurrent pulls of one hot prefix promote it once. A pin of a
  block in a lower tier promotes it into a device slot (verified against its checksum on the way: a
  corrupt copy is dropped and the pull stops there) and pins it, so reads see only device slots.
  Pinned and request-scoped blocks are never in the device LRU, so they never spill.
- The index hears of a full block when it first lands on the device and of its removal only when
  it leaves the last tier; lookups count blocks in every tier.

One lock guards all of it: gRPC handlers run on a thread pool. Index changes are reported to an
IndexSink while the lock is held, so the sink sees them in the order the pool made them.
"""

import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cache_store.spill import DEVICE, Move, SpillTier, SpilledBlock, TierChain
from kvcluster.errors import IntegrityError, InvalidArgument, ResourceExhausted
from kvcluster.kv.block_io import batch_to_payloads
from kvcluster.kv.block_manager import BlockManager
from kvcluster.kv.blocks import checksum
from kvcluster.kv.device import Device
from kvcluster.kv.pool import KVLayout, KVPool
from kvcluster.kv.wire import describe_key
from kvcluster.proto import common_pb2

log = logging.getLogger(__name__)

BlockKey = bytes | str  # chained hash of a full block, or request key of a tail block
MOVE_WAIT_S = 2.0       # longest a pull waits for a block moving between tiers before it stops there


class IndexSink(Protocol):
    """Receives the pool's index changes (full blocks only), in order."""

    def blocks_added(self, block_hashes: list[bytes]) -> None: ...

    def blocks_removed(self, block_hashes: list[bytes]) -> None: ...


class NoIndex:
    """IndexSink of a store that publishes no index."""

    def blocks_added(self, block_hashes: list[bytes]) -> None:
        pass

    def blocks_removed(self, block_hashes: list[bytes]) -> None:
        pass


class LeaseBudgetExceeded(ResourceExhausted):
    """One pusher already holds its share of the pool in leased (request-scoped) blocks."""


@dataclass(eq=False)
class StoredBlock:
    """A published block: where it lives and the header it was pushed with."""

    key: BlockKey
    slot: int
    generation: int
    fingerprint: bytes
    header: common_pb2.BlockRef
    pins: int = 0
    lease_deadline: float | None = None  # request-scoped blocks only
    pusher: Hashable = None              # request-scoped blocks only: whose lease budget it uses
    retired: bool = False                # unmapped while pinned; slot freed at the last release


@dataclass(frozen=True)
class Promotion:
    """A block taken out of `tier` to be copied into the reserved device `slot`; `moves` (the demotions
    that freed that slot) may reuse the block's own slot in `tier`, the swap that keeps a promotion
    from pushing another block out of the last tier."""

    block: SpilledBlock
    tier: SpillTier
    slot: int
    moves: list[Move]
    owns_tier_slot: bool  # False: the demotions reuse the block's lower-tier slot, so read it first


@dataclass
class PoolCounters:
    """Monotonic counters, read by cache_store.metrics. Per-tier ones are keyed by tier name
    ("device", "host", "disk"); spills by (from tier, to tier)."""

    evictions: int = 0
    lease_expiries: int = 0
    lookups: int = 0
    hit_blocks: int = 0
    miss_blocks: int = 0
    spills: dict[tuple[str, str], int] = field(default_factory=dict)
    promotions: dict[str, int] = field(default_factory=dict)    # by the tier promoted from
    drops: dict[str, int] = field(default_factory=dict)         # full blocks that left the store, by tier
    tier_checksum_failures: dict[str, int] = field(default_factory=dict)

    def bump(self, counter: dict, key) -> None:
        counter[key] = counter.get(key, 0) + 1


@dataclass(frozen=True)
class TierStats:
    name: str
    blocks_used: int
    blocks_capacity: int
    bytes_capacity: int


@dataclass(frozen=True)
class PoolStats:
    blocks_used: int
    blocks_capacity: int
    bytes_used: int
    bytes_capacity: int
    pinned_blocks: int
    request_blocks: int
    counters: PoolCounters
    tiers: tuple[TierStats, ...] = ()  # the device first, then each lower tier


class StorePool:
    """Thread-safe block cache over one preallocated tensor (see the module docstring)."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: "Device | str | torch.device" = "cpu",
                 index: IndexSink | None = None, clock: Callable[[], float] = time.monotonic,
                 max_leased_fraction: float = 0.25, tiers: Sequence[SpillTier] = ()):
        self.layout = layout
        # Leased tail blocks cannot be evicted, only expire: one pusher may hold at most this many.
        self.max_leased_per_pusher = max(1, int(num_blocks * max_leased_fraction))
        self._leased_by: dict[Hashable, int] = {}
        self._kv = KVPool(layout, num_blocks, device)
        self._slots = BlockManager(num_blocks)  # free/taken slots (the store keeps its own index)
        self._index = index or NoIndex()
        self._clock = clock
        self._lock = threading.Lock()
        self._landed = threading.Condition(self._lock)  # notified whenever blocks stop moving between tiers
        self._generation = [0] * num_blocks
        self._by_hash: dict[bytes, StoredBlock] = {}
        self._by_request: dict[str, StoredBlock] = {}
        self._lru: OrderedDict[bytes, StoredBlock] = OrderedDict()  # unpinned full blocks, oldest first
        self._leases: list[tuple[float, int, StoredBlock]] = []     # heap of request-block deadlines
        self._pins: dict[Hashable, list[StoredBlock]] = {}
        self._seq = itertools.count()
        self.counters = PoolCounters()
        self._tiers = TierChain(tiers, self._drop, self.counters.spills)  # lower tiers, highest first

    @classmethod
    def from_budget(cls, layout: KVLayout, capacity_bytes: int, device: str | torch.device = "cpu",
                    index: IndexSink | None = None, tiers: Sequence[SpillTier] = ()) -> "StorePool":
        """As many blocks as fit in `capacity_bytes`."""
        num_blocks = capacity_bytes // layout.block_nbytes
        if num_blocks < 1:
            raise InvalidArgument("capacity_bytes", f"{capacity_bytes} holds no block of "
                                  f"{layout.block_nbytes} bytes")
        return cls(layout, num_blocks, device, index, tiers=tiers)

    @property
    def device(self) -> torch.device:
        return self._kv.device

    @property
    def num_blocks(self) -> int:
        return self._kv.num_blocks

    def set_index(self, index: IndexSink) -> None:
        with self._lock:
            self._index = index

    # ---- writing -------------------------------------------------------------------------

    def store(self, key: BlockKey, fingerprint: bytes, header: common_pb2.BlockRef,
              payload: bytes, lease_s: float, pusher: Hashable = None) -> bool:
        """Copy a verified block in. True if stored, False if already held (a duplicate).
        Raises ResourceExhausted when no slot is free or evictable, LeaseBudgetExceeded when
        `pusher` (None = unbudgeted) already holds max_leased_per_pusher request-scoped blocks."""
        with self._lock:
            if self._touch_existing(key, fingerprint, header):
                return False
            if isinstance(key, str) and pusher is not None:
                held = self._leased_by.get(pusher, 0)
                if held >= self.max_leased_per_pusher:
                    raise LeaseBudgetExceeded(f"{describe_key(key)}: this pusher already holds {held} leased "
                                              f"tail blocks, the most one pusher may (a quarter of the pool)")
            slot, moves = self._take_slot()
        self._run_moves(moves)
        try:
            self._kv.import_block(slot, payload)
        except BaseException:
            with self._lock:
                self._slots.free([slot])
            raise
        with self._lock:
            if self._touch_existing(key, fingerprint, header):  # a concurrent push won the race
                self._slots.free([slot])
                return False
            self._publish(StoredBlock(key, slot, self._generation[slot], fingerprint, header, pusher=pusher), lease_s)
            return True

    def _touch_existing(self, key: BlockKey, fingerprint: bytes, header: common_pb2.BlockRef) -> bool:
        entry = self._find(key)
        if entry is None and isinstance(key, bytes):
            entry, tier = self._find_spilled(key)
            if entry is not None and tier is not None and entry.fingerprint == fingerprint:
                tier.touch(key)
        if entry is None:
            return False
        if entry.fingerprint != fingerprint:
            raise IntegrityError(f"{describe_key(key)} is already held under another fingerprint")
        # Two workers may compute a full block's K/V with different rounding; the first copy
        # stays. A request key names one request's tail, so other bytes under it are a bug.
        if isinstance(key, str) and entry.header.checksum != header.checksum:
            raise IntegrityError(f"{describe_key(key)} is already held with a different checksum")
        if entry.key in self._lru:
            self._lru.move_to_end(entry.key)
        return True

    def _take_slot(self) -> tuple[int, list[Move]]:
        """A device slot for the caller, and the moves to run (outside the lock) before it is written:
        the evicted block's way down the tiers."""
        slots = self._slots.allocate(1)
        if not slots and self._expire_leases():
            slots = self._slots.allocate(1)
        moves: list[Move] = []
        if slots:
            slot = slots[0]
        elif self._lru:
            _, victim = self._lru.popitem(last=False)
            self.counters.evictions += 1
            slot = victim.slot
            if self._tiers:
                self._unmap(victim, dropped=False)
                moves = self._tiers.plan_spill(SpilledBlock(victim.key, victim.fingerprint, victim.header), slot)
            else:
                self._unmap(victim)
                self.counters.bump(self.counters.drops, DEVICE)
        else:
            raise ResourceExhausted(f"store pool is full: all {self.num_blocks} blocks are pinned, "
                                    "leased or being written")
        self._generation[slot] += 1
        return slot, moves

    def _run_moves(self, moves: list[Move]) -> None:
        """Copy planned moves' bytes (no lock held: every slot involved is reserved), then land them."""
        if moves:
            failed = self._tiers.copy(moves, self._kv)
            with self._lock:
                self._tiers.land(moves, failed)
                self._landed.notify_all()

    def _drop(self, block: SpilledBlock, tier_name: str) -> None:
        """A full block leaves the store (from `tier_name`): the index hears of it now."""
        self._index.blocks_removed([block.key])
        self.counters.bump(self.counters.drops, tier_name)

    def _publish(self, entry: StoredBlock, lease_s: float) -> None:
        if isinstance(entry.key, bytes):
            self._by_hash[entry.key] = entry
            self._lru[entry.key] = entry
            self._index.blocks_added([entry.key])
        else:
            entry.lease_deadline = self._clock() + lease_s
            self._by_request[entry.key] = entry
            if entry.pusher is not None:
                self._leased_by[entry.pusher] = self._leased_by.get(entry.pusher, 0) + 1
            heapq.heappush(self._leases, (entry.lease_deadline, next(self._seq), entry))

    # ---- reading -------------------------------------------------------------------------

    def lookup(self, fingerprint: bytes, block_hashes: Sequence[bytes]) -> int:
        """How many of `block_hashes`, from the first, are held (in any tier) under `fingerprint`."""
        with self._lock:
            held = 0
            for block_hash in block_hashes:
                entry = self._by_hash.get(block_hash) or self._find_spilled(block_hash)[0]
                if entry is None or entry.fingerprint != fingerprint:
                    break
                held += 1
            self._count_lookup(held, len(block_hashes))
            return held

    def pin(self, fingerprint: bytes, keys: Sequence[BlockKey], owner: Hashable) -> tuple[list[StoredBlock], str]:
        """Pin the longest held prefix of `keys` for `owner`, promoting blocks held in a lower tier into
        device slots. Returns the pinned blocks and, when it stopped early, why."""
        pins: list[StoredBlock] = []
        stop_reason = ""
        while len(pins) < len(keys) and not stop_reason:
            with self._lock:
                stop_reason, promotion = self._pin_resident(fingerprint, keys, owner, pins)
            if promotion is not None:
                stop_reason = self._promote(promotion, len(pins), owner, pins)
        with self._lock:
            self._count_lookup(len(pins), len(keys))
        return pins, stop_reason

    def _pin_resident(self, fingerprint: bytes, keys: Sequence[BlockKey], owner: Hashable,
                      pins: list[StoredBlock]) -> tuple[str, Promotion | None]:
        """Under the lock: pin device blocks from keys[len(pins)] on, up to the first one that is not on
        the device. Returns why it stopped, or the promotion that brings that block up."""
        while len(pins) < len(keys):
            position, key = len(pins), keys[len(pins)]
            entry = self._find(key)
            if entry is not None and entry.fingerprint == fingerprint:
                entry.pins += 1
                self._lru.pop(entry.key, None)
                pins.append(entry)
                self._pins.setdefault(owner, []).append(entry)  # not cached: a cancel may release meanwhile
                continue
            spilled, tier = self._find_spilled(key) if entry is None and isinstance(key, bytes) else (None, None)
            if spilled is not None and spilled.fingerprint == fingerprint:
                if tier is not None:
                    return self._plan_promotion(position, spilled, tier)
                if self._landed.wait_for(lambda: key not in self._tiers.moving, MOVE_WAIT_S):
                    continue  # it landed (on the device, in a tier, or dropped): look again
                return f"block {position} ({describe_key(key)}) is still moving between tiers", None
            found = entry or spilled
            problem = "is not held" if found is None else "was stored under another fingerprint"
            return f"block {position} ({describe_key(key)}) {problem}", None
        return "", None

    def _plan_promotion(self, position: int, block: SpilledBlock, tier: SpillTier) -> tuple[str, Promotion | None]:
        tier.take(block.key)  # first, so the demotions that make room cannot pick it as a victim
        tier.release_slot(block.slot)  # ... and may land in its slot, which is read before they run
        try:
            slot, moves = self._take_slot()
        except ResourceExhausted:
            tier.reclaim_slot(block.slot)
            tier.put(block)
            return (f"block {position} ({describe_key(block.key)}) is in the {tier.name} tier and no device "
                    "slot is free to promote it into"), None
        self._tiers.moving[block.key] = block
        return "", Promotion(block, tier, slot, moves, tier.reclaim_slot(block.slot))

    def _promote(self, promotion: Promotion, position: int, owner: Hashable, pins: list[StoredBlock]) -> str:
        """Copy a block up into its reserved device slot (no lock held), verify it, publish it pinned.
        Returns "" or why the pull stops here."""
        block, tier = promotion.block, promotion.tier
        payload, problem = None, "failed its checksum"
        try:
            try:
                payload = tier.slots.view(block.slot)
                if not promotion.owns_tier_slot:
                    payload = bytes(payload)
            except OSError as exc:
                log.warning("dropping a block: reading it back from the %s tier failed: %s", tier.name, exc)
                problem = f"could not be read back ({exc.strerror or exc})"
            finally:
                self._run_moves(promotion.moves)
            if payload is not None and checksum(payload) == block.header.checksum:
                self._kv.import_block(promotion.slot, payload)
                problem = ""
        except BaseException:
            self._end_promotion(promotion, "failed")
            raise
        return self._end_promotion(promotion, problem, position, owner, pins)

    def _end_promotion(self, promotion: Promotion, problem: str, position: int = 0, owner: Hashable = None,
                       pins: list[StoredBlock] | None = None) -> str:
        """Publish a promoted block pinned for `owner`, or drop it (`problem`); either way its lower-tier
        slot is free again."""
        block, tier, slot = promotion.block, promotion.tier, promotion.slot
        with self._lock:
            del self._tiers.moving[block.key]
            self._landed.notify_all()
            if promotion.owns_tier_slot:
                tier.release_slot(block.slot)
            if problem:
                self._slots.free([slot])
                self._drop(block, tier.name)
                if problem.startswith("failed its checksum"):
                    self.counters.bump(self.counters.tier_checksum_failures, tier.name)
                return f"block {position} ({describe_key(block.key)}) {problem} in the {tier.name} tier"
            entry = StoredBlock(block.key, slot, self._generation[slot], block.fingerprint, block.header, pins=1)
            self._by_hash[block.key] = entry
            self._pins.setdefault(owner, []).append(entry)
            pins.append(entry)
            self.counters.bump(self.counters.promotions, tier.name)
            return ""

    def read(self, blocks: Sequence[StoredBlock]) -> list[bytes]:
        """Pinned blocks' bytes. Needs no lock: a pinned slot is never handed out. One gather and one
        device-to-host copy (through a pinned buffer on CUDA) for all of them; where the pool is host
        memory each block is copied straight out of it instead (a gather would only add a copy)."""
        slots = [block.slot for block in blocks]
        if self._kv.ops.host_memory:
            payloads = [self._kv.export_block(slot) for slot in slots]
        else:
            payloads = batch_to_payloads(self._kv.read(slots))
        for block in blocks:
            if self._generation[block.slot] != block.generation:  # a broken invariant, not a miss
                raise RuntimeError(f"slot {block.slot} was handed out again while pinned")
        return payloads

    def read_views(self, blocks: Sequence[StoredBlock]) -> list[memoryview]:
        """As `read`, but where the pool is host memory each block is a read-only view of its slot (no
        copy; valid while the block stays pinned). Senders that hand bytes to a socket or a message
        use this; a device pool copies to host as `read` does."""
        if not self._kv.ops.host_memory:
            return [memoryview(payload) for payload in self.read(blocks)]
        for block in blocks:
            if self._generation[block.slot] != block.generation:  # a broken invariant, not a miss
                raise RuntimeError(f"slot {block.slot} was handed out again while pinned")
        return [self._kv.block_view(block.slot) for block in blocks]

    def release(self, owner: Hashable, consumed: bool = False) -> None:
        """Drop `owner`'s pins (idempotent). `consumed`: the pull completed, so its request-scoped
        blocks are freed."""
        with self._lock:
            for entry in self._pins.pop(owner, []):
                entry.pins -= 1
                if consumed and isinstance(entry.key, str) and not entry.retired:
                    self._retire(entry)
                elif entry.pins == 0 and entry.retired:
                    self._slots.free([entry.slot])
                elif entry.pins == 0 and isinstance(entry.key, bytes):
                    self._lru[entry.key] = entry

    def discard(self, block: StoredBlock) -> None:
        """Forget a block found corrupt; its slot is freed once its last pin is released."""
        with self._lock:
            self._retire(block)

    def release_all(self) -> None:
        for owner in list(self._pins):
            self.release(owner)

    # ---- housekeeping --------------------------------------------------------------------

    def expire_leases(self) -> int:
        with self._lock:
            return self._expire_leases()

    def _expire_leases(self) -> int:
        now, expired = self._clock(), 0
        while self._leases and self._leases[0][0] <= now:
            deadline, _, entry = heapq.heappop(self._leases)
            if entry.retired or entry.lease_deadline != deadline:
                continue
            if entry.pins:  # being pulled right now: look again shortly
                entry.lease_deadline = now + 1.0
                heapq.heappush(self._leases, (entry.lease_deadline, next(self._seq), entry))
                continue
            self._retire(entry)
            expired += 1
        self.counters.lease_expiries += expired
        return expired

    def leased_by(self, pusher: Hashable) -> int:
        with self._lock:
            return self._leased_by.get(pusher, 0)

    def held_hashes(self) -> list[bytes]:
        """Every full block held, in any tier (what the index should list)."""
        with self._lock:
            return [*self._by_hash, *self._tiers.held_keys()]

    def tier_of(self, block_hash: bytes) -> str | None:
        """Which tier holds a full block ("device", "host", "disk"), "moving", or None."""
        with self._lock:
            if block_hash in self._by_hash:
                return DEVICE
            block, tier = self._find_spilled(block_hash)
            return None if block is None else tier.name if tier is not None else "moving"

    def stats(self) -> PoolStats:
        with self._lock:
            used = self._slots.num_used
            pinned = len({id(entry) for pins in self._pins.values() for entry in pins})
            nbytes = self.layout.block_nbytes
            tiers = (TierStats(DEVICE, used, self.num_blocks, self.num_blocks * nbytes),
                     *(TierStats(tier.name, tier.num_used, tier.num_slots, tier.num_slots * nbytes)
                       for tier in self._tiers.tiers))
            return PoolStats(used, self.num_blocks, used * nbytes, self.num_blocks * nbytes, pinned,
                             len(self._by_request), self.counters, tiers)

    def close(self) -> None:
        """Free the lower tiers' storage (the disk tier's file is removed)."""
        with self._lock:
            self._tiers.close()

    # ---- internals -----------------------------------------------------------------------

    def _find(self, key: BlockKey) -> StoredBlock | None:
        """A block on the device (full or request-scoped)."""
        return self._by_hash.get(key) if isinstance(key, bytes) else self._by_request.get(key)

    def _find_spilled(self, key: bytes) -> tuple[SpilledBlock | None, SpillTier | None]:
        """A full block in a lower tier and that tier, or one moving between tiers and None."""
        return self._tiers.find(key)

    def _unmap(self, entry: StoredBlock, dropped: bool = True) -> None:
        """Take a block off the device; `dropped`: it leaves the store (not going down a tier)."""
        if isinstance(entry.key, bytes):
            del self._by_hash[entry.key]
            self._lru.pop(entry.key, None)
            if dropped:
                self._index.blocks_removed([entry.key])
        else:
            del self._by_request[entry.key]
            if entry.pusher is not None:
                left = self._leased_by.pop(entry.pusher) - 1
                if left:
                    self._leased_by[entry.pusher] = left

    def _retire(self, entry: StoredBlock) -> None:
        if entry.retired:
            return
        self._unmap(entry)
        entry.retired = True
        if entry.pins == 0:
            self._slots.free([entry.slot])

    def _count_lookup(self, hits: int, requested: int) -> None:
        self.counters.lookups += 1
        self.counters.hit_blocks += hits
        self.counters.miss_blocks += requested - hits
