"""The paged KV pool: one preallocated tensor of fixed-size blocks, and the block byte format.

Pool tensor: [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim].
A block on the wire is `pool[slot]` as raw contiguous bytes. Blocks move in batches
(`kvcluster.kv.block_io.BlockBatch`): `read` is one gather over the pool and `write` one scatter,
whatever the number of blocks; the host side (bytes, pinned buffers, device copies) happens off
the thread that owns the pool.

The pool is only the tensor and its byte I/O: which slot is free, referenced or cached under a
hash is `kvcluster.kv.block_manager.BlockManager`'s bookkeeping.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcluster.kv.block_io import BlockBatch, batch_from_payloads, batch_to_payloads
from kvcluster.kv.device import Device, device_of
from kvcluster.kv.dtypes import DTYPES

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
    """A preallocated tensor of KV blocks, one row per slot; `BlockManager` says which slot holds what."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: Device | str | torch.device = "cpu"):
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.layout = layout
        self.num_blocks = num_blocks
        self.ops = device_of(device)  # how bytes reach this pool (kvcluster.kv.device)
        # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        self.kv = torch.zeros((num_blocks, *layout.block_shape), dtype=layout.torch_dtype, device=self.ops.torch_device)
        self._bytes = self.kv.view(torch.uint8).view(num_blocks, layout.block_nbytes)  # [num_blocks, block_nbytes]

    @classmethod
    def from_budget(cls, layout: KVLayout, capacity_bytes: int, device: Device | str | torch.device = "cpu") -> "KVPool":
        return cls(layout, capacity_bytes // layout.block_nbytes, device)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def same_bytes(self, a: int, b: int) -> bool:
        """Whether two slots hold bitwise-identical blocks."""
        return torch.equal(self._bytes[a], self._bytes[b])

    def copy_slot(self, source: int, target: int) -> None:
        """Copy one block's K/V (copy-on-write of a shared block about to be written)."""
        self.kv[target].copy_(self.kv[source])

    def read(self, slots: Sequence[int]) -> BlockBatch:
        """A snapshot of `slots` as one [n, block_nbytes] tensor on the pool's device: one gather.
        Later writes to those slots do not change it (on CUDA, once its `ready` event has passed)."""
        index = torch.as_tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)
        return BlockBatch.on_current_stream(self._bytes.index_select(0, index), self.ops)

    def write(self, slots: Sequence[int], batch: BlockBatch) -> None:
        """Copy `batch` (one row per slot, any device) into `slots`: one scatter."""
        if batch.data.shape != (len(slots), self.layout.block_nbytes):
            raise ValueError(f"batch of shape {tuple(batch.data.shape)} does not fit {len(slots)} blocks "
                             f"of {self.layout.block_nbytes} bytes")
        if not slots:
            return
        data = batch.on_device(self.device)
        if len(slots) == 1:  # a plain row copy: index_copy_ of one wide uint8 row is several times slower on CPU
            self._bytes[slots[0]].copy_(data[0])
            return
        index = torch.as_tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)
        self._bytes.index_copy_(0, index, data)

    def export_block(self, slot: int) -> bytes:
        """One block's bytes in wire format. Not a snapshot taken on the owner's thread: for slots
        that cannot change meanwhile (a store's pinned blocks)."""
        if self.ops.host_memory:  # straight from the pool: one copy, no staging buffer
            return self._bytes[slot].numpy().tobytes()
        return batch_to_payloads(self.read([slot]))[0]

    def copy_out(self, slot: int, host_row: torch.Tensor) -> None:
        """Copy one block's bytes into `host_row` ([block_nbytes] uint8 on the host; page-locked on CUDA
        makes it one direct copy). Returns when the copy is done."""
        host_row.copy_(self._bytes[slot])

    def block_view(self, slot: int) -> memoryview:
        """One block's bytes in place, for a host-memory pool only: valid while the slot cannot change."""
        if not self.ops.host_memory:
            raise ValueError("a device pool's blocks have no host view: use export_block or read")
        return memoryview(self._bytes[slot].numpy()).toreadonly()

    def import_block(self, slot: int, payload: bytes | bytearray | memoryview) -> None:
        """Write one block's wire-format bytes into `slot`."""
        self.write([slot], batch_from_payloads([payload], self.layout.block_nbytes, self.ops))
