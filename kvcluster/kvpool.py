"""The paged KV pool: one preallocated tensor of fixed-size blocks, and the block byte format.

Pool tensor: [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim].
A block on the wire is `pool[slot]` as raw contiguous bytes. Blocks move in batches
(`kvcluster.block_io.BlockBatch`): `read` is one gather over the pool and `write` one scatter,
whatever the number of blocks; the host side (bytes, pinned buffers, device copies) happens off
the thread that owns the pool.

Slots are reference counted, and a full block can be registered under its chained hash: that is
the worker-local prefix cache (the first tier; the cache store is the second). Sequences with a
common prefix `match` the same physical slots; a slot whose last reference goes keeps its block
and its hash (evictable, least recently used first) until `allocate` needs the room. Only the
pool's owner thread changes it; `peek` is a read-only hint for other threads.

A `listener` (an IndexSink: `blocks_added`, `blocks_removed`) hears of every hash registered and
every cached block evicted, in order, on the owner's thread; it must only enqueue (a decode worker
publishes them to Redis from another thread so the gateway can route by what each pool holds).
"""

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcluster.block_io import BlockBatch, batch_from_payloads, batch_to_payloads
from kvcluster.dtypes import DTYPES

LAYOUT_VERSION = 1


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype of one KV block; part of the fingerprint."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    version: int = LAYOUT_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_nbytes(self) -> int:
        return self.block_size * self.token_nbytes

    @property
    def token_nbytes(self) -> int:
        element = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * element

    def canonical(self) -> str:
        """Stable text form, hashed into the fingerprint."""
        return (f"kvlayout-v{self.version}:L{self.num_layers}:B{self.block_size}:"
                f"H{self.num_kv_heads}:D{self.head_dim}:{self.dtype}")


class KVPool:
    """A preallocated tensor of KV blocks, reference-counted slots and a hash index of full blocks.
    No allocation per request."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: str | torch.device = "cpu"):
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.layout = layout
        self.num_blocks = num_blocks
        # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        self.kv = torch.zeros((num_blocks, *layout.block_shape), dtype=layout.torch_dtype, device=device)
        self._bytes = self.kv.view(torch.uint8).view(num_blocks, layout.block_nbytes)  # [num_blocks, block_nbytes]
        self._free: deque[int] = deque(range(num_blocks))  # no references, no block worth keeping
        self._refs = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # no references, a cached block; LRU first
        self._slot_of: dict[bytes, int] = {}   # block hash -> slot holding it
        self._hash_of: dict[int, bytes] = {}
        self.evictions = 0
        self.listener = None  # IndexSink told of registered and evicted hashes; None = nobody

    @classmethod
    def from_budget(cls, layout: KVLayout, capacity_bytes: int, device: str | torch.device = "cpu") -> "KVPool":
        return cls(layout, capacity_bytes // layout.block_nbytes, device)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def num_free(self) -> int:
        """Slots `allocate` can hand out: free ones plus cached blocks nobody references."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Slots referenced by someone."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash (referenced or not)."""
        return len(self._slot_of)

    def allocate(self, count: int) -> list[int] | None:
        """`count` slots with one reference each, or None when the pool cannot spare them. Free slots
        go first; then the least recently used unreferenced cached blocks are evicted."""
        if count > self.num_free:
            return None
        slots, evicted = [], []
        for _ in range(count):
            if self._free:
                slot = self._free.popleft()
            else:
                slot, _ = self._evictable.popitem(last=False)
                evicted.append(self._hash_of.pop(slot))
                del self._slot_of[evicted[-1]]
                self.evictions += 1
            self._refs[slot] = 1
            slots.append(slot)
        if evicted and self.listener is not None:
            self.listener.blocks_removed(evicted)
        return slots

    def free(self, slots: Sequence[int]) -> None:
        """Drop one reference to each slot. A slot left without references becomes free, or
        evictable if it holds a registered block."""
        for slot in slots:
            refs = self._refs[slot] - 1
            if refs < 0:
                raise RuntimeError(f"KV slot {slot} released more often than it was taken")
            self._refs[slot] = refs
            if refs == 0:
                if slot in self._hash_of:
                    self._evictable[slot] = None
                else:
                    self._free.append(slot)

    def refs(self, slot: int) -> int:
        return self._refs[slot]

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """Slots of the longest prefix of `hashes` held here, each with one more reference."""
        slots = []
        for block_hash in hashes:
            slot = self._slot_of.get(block_hash)
            if slot is None:
                break
            if self._refs[slot] == 0:
                del self._evictable[slot]
            self._refs[slot] += 1
            slots.append(slot)
        return slots

    def peek(self, hashes: Sequence[bytes]) -> int:
        """How many leading `hashes` are held now: a hint for other threads (a block may be evicted
        before they act on it; `match` on the owner's thread is the authority)."""
        held = 0
        for block_hash in hashes:
            if block_hash not in self._slot_of:
                break
            held += 1
        return held

    def same_bytes(self, a: int, b: int) -> bool:
        """Whether two slots hold bitwise-identical blocks."""
        return torch.equal(self._bytes[a], self._bytes[b])

    def slot_of(self, block_hash: bytes) -> int | None:
        """The slot holding `block_hash` now, without taking a reference (owner's thread only)."""
        return self._slot_of.get(block_hash)

    def register(self, block_hash: bytes, slot: int) -> bool:
        """Make the full block in `slot` findable under `block_hash`. False (nothing changes) when the
        hash is already held elsewhere or the slot already holds another block."""
        if block_hash in self._slot_of or slot in self._hash_of:
            return False
        self._slot_of[block_hash] = slot
        self._hash_of[slot] = block_hash
        if self.listener is not None:
            self.listener.blocks_added([block_hash])
        return True

    def cached_hashes(self) -> list[bytes]:
        """Every hash findable now (owner's thread: a snapshot for a listener that starts late)."""
        return list(self._slot_of)

    def copy_slot(self, source: int, target: int) -> None:
        """Copy one block's K/V (copy-on-write of a shared block about to be written)."""
        self.kv[target].copy_(self.kv[source])

    def read(self, slots: Sequence[int]) -> BlockBatch:
        """A snapshot of `slots` as one [n, block_nbytes] tensor on the pool's device: one gather.
        Later writes to those slots do not change it (on CUDA, once its `ready` event has passed)."""
        index = torch.as_tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)
        return BlockBatch.on_current_stream(self._bytes.index_select(0, index))

    def write(self, slots: Sequence[int], batch: BlockBatch) -> None:
        """Copy `batch` (one row per slot, any device) into `slots`: one scatter."""
        if batch.data.shape != (len(slots), self.layout.block_nbytes):
            raise ValueError(f"batch of shape {tuple(batch.data.shape)} does not fit {len(slots)} blocks "
                             f"of {self.layout.block_nbytes} bytes")
        if not slots:
            return
        data = batch.on_device(self.device)
        index = torch.as_tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)
        self._bytes.index_copy_(0, index, data)

    def export_block(self, slot: int) -> bytes:
        """One block's bytes in wire format. Not a snapshot taken on the owner's thread: for slots
        that cannot change meanwhile (a store's pinned blocks)."""
        if self.device.type == "cpu":  # straight from the pool: one copy, no staging buffer
            return self._bytes[slot].numpy().tobytes()
        return batch_to_payloads(self.read([slot]))[0]

    def import_block(self, slot: int, payload: bytes | bytearray | memoryview) -> None:
        """Write one block's wire-format bytes into `slot`."""
        self.write([slot], batch_from_payloads([payload], self.layout.block_nbytes, self.device))
