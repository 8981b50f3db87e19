"""Moving many KV blocks at once between a pool tensor and wire bytes.

A `BlockBatch` is n blocks as one [n, block_nbytes] uint8 tensor. The thread that owns a pool
only gathers (`KVPool.read`) or scatters (`KVPool.write`) a whole batch in one op; turning a
batch into bytes, or bytes into a batch, runs on the caller's thread (a gRPC handler or a push
thread), so a transfer never holds the engine thread for its duration.

The device's verbs (kvcluster.kv.device) do the device-specific part, the same lines run for CPU and
CUDA: on CUDA the host side goes through page-locked (pinned) buffers with non-blocking copies on a
side stream, and an event orders the consumer after the producer, so nothing waits for the whole
device; on CPU those are no-ops and a single block is read in place.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvcluster.kv.device import Device, ReadyEvent, device_of


@dataclass
class BlockBatch:
    """n blocks as one [n, block_nbytes] uint8 tensor on `device`, complete once `ready` has passed."""

    data: torch.Tensor
    ready: ReadyEvent | None = None
    keep_alive: torch.Tensor | None = None  # the host buffer an in-flight copy still reads
    device: Device | None = None            # where `data` lives (None: the plain device of data)

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = device_of(self.data.device)

    @property
    def num_blocks(self) -> int:
        return self.data.shape[0]

    def rows(self, start: int, end: int) -> "BlockBatch":
        """Blocks [start, end) of this batch (a view; same readiness)."""
        return BlockBatch(self.data[start:end], self.ready, self.keep_alive, self.device)

    @classmethod
    def on_current_stream(cls, data: torch.Tensor, device: Device | None = None) -> "BlockBatch":
        """A batch produced by work just queued on `device`'s current stream."""
        device = device or device_of(data.device)
        return cls(data, device.record(), device=device)

    def on_device(self, device: torch.device) -> torch.Tensor:
        """The rows on `device`, safe to read by work queued next on the current stream."""
        if self.ready is not None:
            self.ready.wait(self.data)
        if self.data.device == device:
            return self.data
        return self.data.to(device, non_blocking=True)


def batch_from_payloads(payloads: Sequence[bytes | bytearray | memoryview], block_nbytes: int,
                        device: Device | torch.device | str = "cpu") -> BlockBatch:
    """Stage wire payloads as one batch for `device`: one host buffer (pinned for CUDA) and one
    queued host-to-device copy on a side stream (none where device memory is host memory)."""
    device = device_of(device)
    for i, payload in enumerate(payloads):
        if len(payload) != block_nbytes:
            raise ValueError(f"block payload {i} is {len(payload)} bytes, the layout needs {block_nbytes}")
    if len(payloads) == 1 and device.host_memory:  # one block for a host pool: read it in place, no staging copy
        return BlockBatch(_view(payloads[0]).view(1, block_nbytes), device=device)
    host = device.host_buffer((len(payloads), block_nbytes))
    rows = host.numpy()
    for i, payload in enumerate(payloads):
        rows[i] = np.frombuffer(payload, dtype=np.uint8)
    with device.side_stream() as stream:
        data = device.upload(host)
        ready = device.record(stream)
    return BlockBatch(data, ready, keep_alive=host, device=device)


def batch_to_payloads(batch: BlockBatch) -> list[bytes]:
    """One bytes object per block: one device-to-host copy (into a pinned buffer on CUDA) on a side
    stream, waiting only for the batch's own producer."""
    device = batch.device
    with device.side_stream() as stream:
        if batch.ready is not None:
            batch.ready.wait(batch.data)
        host = device.download(batch.data)
    device.synchronize(stream)
    rows = host.numpy()
    return [rows[i].tobytes() for i in range(rows.shape[0])]


def _view(payload: bytes | bytearray | memoryview) -> torch.Tensor:
    """A read-only uint8 tensor over `payload`'s memory (only ever copied from, never written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer warns on read-only buffers (protobuf bytes)
        return torch.frombuffer(payload, dtype=torch.uint8)
