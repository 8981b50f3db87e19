"""Moving many KV blocks at once between a pool tensor and wire bytes.

A `BlockBatch` is n blocks as one [n, block_nbytes] uint8 tensor. The thread that owns a pool
only gathers (`KVPool.read`) or scatters (`KVPool.write`) a whole batch in one op; turning a
batch into bytes, or bytes into a batch, runs on the caller's thread (a gRPC handler or a push
thread), so a transfer never holds the engine thread for its duration.

On CUDA the host side goes through page-locked (pinned) buffers with non-blocking copies on a
side stream; an event orders the consumer after the producer, so nothing waits for the whole
device (torch's caching host allocator reuses the pinned buffers).
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class BlockBatch:
    """n blocks as one [n, block_nbytes] uint8 tensor, complete once `ready` (CUDA only) has passed."""

    data: torch.Tensor
    ready: torch.cuda.Event | None = None
    keep_alive: torch.Tensor | None = None  # the pinned host buffer an in-flight copy still reads

    @property
    def num_blocks(self) -> int:
        return self.data.shape[0]

    def rows(self, start: int, end: int) -> "BlockBatch":
        """Blocks [start, end) of this batch (a view; same readiness)."""
        return BlockBatch(self.data[start:end], self.ready, self.keep_alive)

    @classmethod
    def on_current_stream(cls, data: torch.Tensor) -> "BlockBatch":
        """A batch produced by work just queued on the current stream."""
        if not data.is_cuda:
            return cls(data)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(data.device))
        return cls(data, event)

    def on_device(self, device: torch.device) -> torch.Tensor:
        """The rows on `device`, safe to read by work queued next on the current stream."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.data.device)
            stream.wait_event(self.ready)
            self.data.record_stream(stream)  # produced on a side stream, consumed on this one
        if self.data.device == device:
            return self.data
        return self.data.to(device, non_blocking=True)


def batch_from_payloads(payloads: Sequence[bytes | bytearray | memoryview], block_nbytes: int,
                        device: torch.device | str = "cpu") -> BlockBatch:
    """Stage wire payloads as one batch for `device`: one host buffer (pinned for CUDA) and, on
    CUDA, one non-blocking host-to-device copy on a side stream."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    for i, payload in enumerate(payloads):
        if len(payload) != block_nbytes:
            raise ValueError(f"block payload {i} is {len(payload)} bytes, the layout needs {block_nbytes}")
    if len(payloads) == 1 and not cuda:  # one block for a CPU pool: read it in place, no staging copy
        return BlockBatch(_view(payloads[0]).view(1, block_nbytes))
    host = torch.empty((len(payloads), block_nbytes), dtype=torch.uint8, pin_memory=cuda)
    rows = host.numpy()
    for i, payload in enumerate(payloads):
        rows[i] = np.frombuffer(payload, dtype=np.uint8)
    if not cuda:
        return BlockBatch(host)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        data = host.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return BlockBatch(data, event, keep_alive=host)


def batch_to_payloads(batch: BlockBatch) -> list[bytes]:
    """One bytes object per block. On CUDA: one device-to-host copy into a pinned buffer on a side
    stream, waiting only for the batch's own producer."""
    data = batch.data
    if data.is_cuda:
        stream = torch.cuda.Stream(data.device)
        with torch.cuda.stream(stream):
            if batch.ready is not None:
                stream.wait_event(batch.ready)
            host = torch.empty(data.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(data, non_blocking=True)
            data.record_stream(stream)
        stream.synchronize()
        data = host
    rows = data.numpy()
    return [rows[i].tobytes() for i in range(rows.shape[0])]


def _view(payload: bytes | bytearray | memoryview) -> torch.Tensor:
    """A read-only uint8 tensor over `payload`'s memory (only ever copied from, never written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer warns on read-only buffers (protobuf bytes)
        return torch.frombuffer(payload, dtype=torch.uint8)
