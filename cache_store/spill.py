"""The store's lower tiers: where blocks evicted from the device pool go before they are dropped.

Two kinds of slot storage, both preallocated at start-up and bounded:
- `HostSlots`: one uint8 tensor [num_slots, block_nbytes] in host memory, page-locked when the pool
  is on CUDA, so device <-> host copies go straight between the pool and the tier.
- `DiskSlots`: one file of num_slots * block_nbytes bytes, given its full size when it is created
  (posix_fallocate, or truncate where the file system cannot), read and written with os.pread and
  os.pwrite at slot offsets. It never grows; it is removed when the tier is closed.

`SpillTier` is one tier's bookkeeping: free slots and an LRU of the blocks it holds (an OrderedDict,
oldest first; blocks in a lower tier are never pinned, so every one of them is evictable). `TierChain`
is the tiers under one device pool and the way down through them: it plans where an evicted block
and the victims it displaces go, copies their bytes, and lands them. Neither has a lock of its own:
the StorePool's lock guards planning and landing, and copies run outside it on slots a plan reserved
(see cache_store.pool).
"""

import errno
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from kvcluster.errors import InvalidArgument
from kvcluster.kv.pool import KVLayout, KVPool
from kvcluster.proto import common_pb2

log = logging.getLogger(__name__)

DEVICE, HOST, DISK = "device", "host", "disk"


@dataclass(eq=False)
class SpilledBlock:
    """A full block held in a lower tier (or moving between tiers): its slot there and its header."""

    key: bytes
    fingerprint: bytes
    header: common_pb2.BlockRef
    slot: int = -1


class SlotStorage(Protocol):
    """Fixed-size block slots in some memory; `num_slots` of `block_nbytes` bytes."""

    num_slots: int

    def view(self, slot: int) -> bytes | memoryview: ...

    def write(self, slot: int, payload: bytes | memoryview) -> None: ...

    def save_from(self, slot: int, pool: KVPool, pool_slot: int) -> None: ...

    def close(self) -> None: ...


class HostSlots:
    """Block slots in one host-memory tensor (page-locked when the device pool is on CUDA)."""

    def __init__(self, num_slots: int, block_nbytes: int, pinned: bool = False):
        self.num_slots = num_slots
        # [num_slots, block_nbytes]
        self.rows = torch.zeros((num_slots, block_nbytes), dtype=torch.uint8, pin_memory=pinned)
        self._array = self.rows.numpy()

    def view(self, slot: int) -> memoryview:
        return memoryview(self._array[slot])

    def write(self, slot: int, payload: bytes | memoryview) -> None:
        self._array[slot] = np.frombuffer(payload, dtype=np.uint8)

    def save_from(self, slot: int, pool: KVPool, pool_slot: int) -> None:
        pool.copy_out(pool_slot, self.rows[slot])

    def close(self) -> None:
        pass


class DiskSlots:
    """Block slots in one preallocated local file, removed on close."""

    def __init__(self, num_slots: int, block_nbytes: int, path: str = ""):
        self.num_slots = num_slots
        self.block_nbytes = block_nbytes
        self.size = num_slots * block_nbytes
        try:
            if path:
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                self.path = path
            else:
                self.fd, self.path = tempfile.mkstemp(prefix="kvcluster-spill-", suffix=".blocks")
        except OSError as exc:
            raise InvalidArgument("disk_tier_path", f"cannot create {path or tempfile.gettempdir()}: "
                                  f"{exc.strerror}") from None
        try:
            _preallocate(self.fd, self.size)
        except OSError as exc:
            self.close()
            raise InvalidArgument("disk_tier_bytes", f"cannot preallocate {self.size} bytes in {self.path}: "
                                  f"{exc.strerror}") from None

    def view(self, slot: int) -> bytes:
        offset, parts, left = slot * self.block_nbytes, [], self.block_nbytes
        while left:
            part = os.pread(self.fd, left, offset)
            if not part:
                raise OSError(errno.EIO, f"short read of slot {slot} in {self.path}")
            parts.append(part)
            offset, left = offset + len(part), left - len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, slot: int, payload: bytes | memoryview) -> None:
        view, offset = memoryview(payload).cast("B"), slot * self.block_nbytes
        if len(view) != self.block_nbytes:
            raise ValueError(f"a disk slot holds {self.block_nbytes} bytes, got {len(view)}")
        while len(view):
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def save_from(self, slot: int, pool: KVPool, pool_slot: int) -> None:
        self.write(slot, pool.export_block(pool_slot))

    def close(self) -> None:
        fd, self.fd = self.fd, -1  # first: a copy still running after a stop fails with EBADF (a drop)
        if fd < 0:                 # rather than write to whatever file reuses the number
            return
        os.close(fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _preallocate(fd: int, size: int) -> None:
    """Give the file its full size now, so it never grows and a full disk shows at start-up."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # a file system without fallocate: at least the size is fixed


class SpillTier:
    """One lower tier: slot storage, its free slots, and the LRU of blocks it holds."""

    def __init__(self, name: str, slots: SlotStorage):
        self.name = name
        self.slots = slots
        self.blocks: OrderedDict[bytes, SpilledBlock] = OrderedDict()  # oldest first
        self._free = list(range(slots.num_slots - 1, -1, -1))           # pop() hands out slot 0 first

    @property
    def num_slots(self) -> int:
        return self.slots.num_slots

    @property
    def num_used(self) -> int:
        """Slots holding or reserved for a block."""
        return self.num_slots - len(self._free)

    def get(self, key: bytes) -> SpilledBlock | None:
        return self.blocks.get(key)

    def touch(self, key: bytes) -> None:
        self.blocks.move_to_end(key)

    def free_slot(self) -> int | None:
        return self._free.pop() if self._free else None

    def release_slot(self, slot: int) -> None:
        self._free.append(slot)

    def reclaim_slot(self, slot: int) -> bool:
        """Reserve a released `slot` again if nothing took it meanwhile; whether it did."""
        if self._free and self._free[-1] == slot:
            self._free.pop()
            return True
        return False

    def pop_victim(self) -> SpilledBlock | None:
        """The least recently used block, taken out; its slot stays reserved for the caller."""
        return self.blocks.popitem(last=False)[1] if self.blocks else None

    def take(self, key: bytes) -> SpilledBlock:
        """Take a block out (to promote it); its slot stays reserved until `release_slot`."""
        return self.blocks.pop(key)

    def put(self, block: SpilledBlock) -> None:
        """Hold `block` (in `block.slot`, already written) as the most recently used."""
        self.blocks[block.key] = block

    def close(self) -> None:
        self.slots.close()


@dataclass(frozen=True)
class Move:
    """One block's bytes to copy from a slot of `source` (None: the device pool) to a reserved slot of
    `target`, planned under the pool's lock and copied outside it."""

    block: SpilledBlock
    source: SpillTier | None
    source_slot: int
    target: SpillTier
    target_slot: int

    @property
    def source_name(self) -> str:
        return DEVICE if self.source is None else self.source.name


class TierChain:
    """The lower tiers under one device pool, highest first, and the full blocks moving between them.

    `plan_spill`, `find` and `land` run under the pool's lock; `copy` runs outside it and touches only
    slots a plan reserved. A block that leaves the last tier goes to `drop(block, tier it left)`;
    landed moves are counted in `spills[(from tier, to tier)]`."""

    def __init__(self, tiers: Sequence[SpillTier], drop: Callable[[SpilledBlock, str], None],
                 spills: dict[tuple[str, str], int]):
        self.tiers = list(tiers)
        self.moving: dict[bytes, SpilledBlock] = {}  # held, but neither in a tier's LRU nor pinnable
        self._drop = drop
        self._spills = spills

    def __bool__(self) -> bool:
        return bool(self.tiers)

    def find(self, key: bytes) -> tuple[SpilledBlock | None, SpillTier | None]:
        """A block in a lower tier and that tier, or one moving between tiers and None."""
        for tier in self.tiers:
            block = tier.get(key)
            if block is not None:
                return block, tier
        return self.moving.get(key), None

    def held_keys(self) -> list[bytes]:
        return [*self.moving, *(key for tier in self.tiers for key in tier.blocks)]

    def plan_spill(self, block: SpilledBlock, source_slot: int, source: SpillTier | None = None,
                   depth: int = 0) -> list[Move]:
        """Reserve a slot for `block` in tier `depth`, making room by sending that tier's LRU victim one
        tier down (or dropping it from the last tier). Returns the moves deepest first: the order that
        reads every slot before it is overwritten."""
        tier = self.tiers[depth]
        target_slot = tier.free_slot()
        moves: list[Move] = []
        if target_slot is None:
            victim = tier.pop_victim()
            if victim is None:  # every slot is reserved by moves in flight: nowhere to go
                self._drop(block, DEVICE if source is None else source.name)
                return []
            target_slot = victim.slot
            if depth + 1 < len(self.tiers):
                self.moving[victim.key] = victim
                moves = self.plan_spill(victim, victim.slot, tier, depth + 1)
            else:
                self._drop(victim, tier.name)
        self.moving[block.key] = block
        moves.append(Move(block, source, source_slot, tier, target_slot))
        return moves

    @staticmethod
    def copy(moves: list[Move], pool: KVPool) -> set[int]:
        """Copy planned moves' bytes (no lock held). Returns the indices of moves that failed."""
        failed = set()
        for i, move in enumerate(moves):
            try:
                if move.source is None:
                    move.target.slots.save_from(move.target_slot, pool, move.source_slot)
                else:
                    move.target.slots.write(move.target_slot, move.source.slots.view(move.source_slot))
            except OSError as exc:
                log.warning("dropping a block: copying it to the %s tier failed: %s", move.target.name, exc)
                failed.add(i)
        return failed

    def land(self, moves: list[Move], failed: set[int]) -> None:
        """Publish copied blocks in their new tiers; a failed move (a disk error) drops its block."""
        for i, move in enumerate(moves):
            del self.moving[move.block.key]
            if i in failed:
                move.target.release_slot(move.target_slot)
                self._drop(move.block, move.source_name)
                continue
            move.block.slot = move.target_slot
            move.target.put(move.block)
            key = (move.source_name, move.target.name)
            self._spills[key] = self._spills.get(key, 0) + 1

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()


def make_tiers(layout: KVLayout, host_bytes: int, disk_bytes: int, disk_path: str = "",
               pinned: bool = False) -> list[SpillTier]:
    """The lower tiers a store was configured with, highest first: host, then disk; 0 bytes = none."""
    tiers = []
    for name, size, field in ((HOST, host_bytes, "host_tier_bytes"), (DISK, disk_bytes, "disk_tier_bytes")):
        if size < 0:
            raise InvalidArgument(field, f"must be >= 0, got {size}")
        if size and size < layout.block_nbytes:
            raise InvalidArgument(field, f"{size} holds no block of {layout.block_nbytes} bytes")
    if host_bytes:
        tiers.append(SpillTier(HOST, HostSlots(host_bytes // layout.block_nbytes, layout.block_nbytes, pinned)))
    if disk_bytes:
        tiers.append(SpillTier(DISK, DiskSlots(disk_bytes // layout.block_nbytes, layout.block_nbytes, disk_path)))
    return tiers
