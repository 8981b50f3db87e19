"""The store's lower tiers: where blocks evicted from the device pool go before they are dropped.

Two kinds of slot storage, both preallocated at start-up and bounded:
- `HostSlots`: one uint8 tensor [num_slots, block_nbytes] in host memory, page-locked when the pool
  is on CUDA, so device <-> host copies go straight between the pool and the tier.
- `DiskSlots`: one file of num_slots * block_nbytes bytes, given its full size when it is created
  (posix_fallocate, or truncate where the file system cannot), read and written with os.pread and
  os.pwrite at slot offsets. It never grows; it is removed when the tier is closed.

`SpillTier` is one tier's bookkeeping: free slots and an LRU of the blocks it holds (an OrderedDict,
oldest first; blocks in a lower tier are never pinned, so every one of them is evictable). It has no
lock of its own: the StorePool's lock guards it, and the pool copies bytes between tiers outside that
lock into slots it reserved (see cache_store.pool).
"""

import errno
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from kvcluster.errors import InvalidArgument
from kvcluster.kvpool import KVLayout, KVPool
from kvcluster.proto import common_pb2

HOST, DISK = "host", "disk"


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
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
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
