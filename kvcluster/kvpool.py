"""The paged KV pool: one preallocated tensor of fixed-size blocks, and the block byte format.

Pool tensor: [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim].
A block on the wire is `pool[slot]` as raw contiguous bytes, so export and import are one copy.
"""

import warnings
from collections import deque
from dataclasses import dataclass

import torch

LAYOUT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}



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
    """A preallocated tensor of KV blocks plus its free slots. No allocation per request."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: str | torch.device = "cpu"):
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.layout = layout
        self.num_blocks = num_blocks
        # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        self.kv = torch.zeros((num_blocks, *layout.block_shape), dtype=layout.torch_dtype, device=device)
        self._free: deque[int] = deque(range(num_blocks))

    @classmethod
    def from_budget(cls, layout: KVLayout, capacity_bytes: int, device: str | torch.device = "cpu") -> "KVPool":
        return cls(layout, capacity_bytes // layout.block_nbytes, device)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` free slots, or None when the pool cannot spare them."""
        if count > len(self._free):
            return None
        return [self._free.popleft() for _ in range(count)]

    def free(self, slots: list[int]) -> None:
        self._free.extend(slots)

    def export_block(self, slot: int) -> bytes:
        """The block's bytes in wire format (a host copy of `kv[slot]`)."""
        return self.kv[slot].view(torch.uint8).cpu().numpy().tobytes()

    def import_block(self, slot: int, payload: bytes | bytearray | memoryview) -> None:
        """Write wire-format bytes into `slot`."""
        if len(payload) != self.layout.block_nbytes:
            raise ValueError(f"block payload is {len(payload)} bytes, layout needs {self.layout.block_nbytes}")
        with warnings.catch_warnings():
            # frombuffer warns on read-only buffers (protobuf bytes); this view is only read.
            warnings.simplefilter("ignore", UserWarning)
            source = torch.frombuffer(payload, dtype=torch.uint8)
        self.kv[slot].view(torch.uint8).view(-1).copy_(source)
