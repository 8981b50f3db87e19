"""The device a pool lives on, as the KV pools and block transfers use it: one interface for CPU and
CUDA, so both run the same lines of kvcluster.kv.block_io, kvcluster.kv.pool and the store's pool, and
only the few verbs below differ.

- `host_buffer`: a staging buffer on the host, page-locked on CUDA so copies overlap with compute.
- `side_stream`: a context whose copies queue apart from the compute stream (CUDA: its own stream).
- `record` an event after the work queued so far; `ReadyEvent.wait` makes the consumer's stream
  wait for it (and keeps the tensor alive for that stream).
- `upload` / `download`: queued copies host -> device / device -> host; `synchronize` waits for one
  stream.
- `host_memory`: whether the device's memory is host memory (CPU). Then a block can be read in
  place and staged bytes need no copy; the CPU path uses that to skip copies, not other code.

On CPU, streams and events are no-ops: CPU work is done when the call returns. Tests run the
accelerator's sequence on CPU through a stand-in whose copies only land when waited for
(tests/device_stand_in.py), which is how the CUDA transfer code is tested without a GPU.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch


class ReadyEvent(Protocol):
    """Work queued on a device that a consumer must wait for."""

    def wait(self, tensor: torch.Tensor) -> None:
        """Order the current stream after the event; `tensor` (produced before it) is in use there."""


class Device:
    """The host (CPU): memory is host memory, work is complete when a call returns."""

    host_memory = True

    def __init__(self, device: torch.device | str = "cpu"):
        self.torch_device = torch.device(device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.torch_device})"

    @property
    def type(self) -> str:
        return self.torch_device.type

    def name(self) -> str:
        return "cpu"

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    @contextmanager
    def side_stream(self) -> Iterator[object]:
        yield None

    def record(self, stream: object = None) -> ReadyEvent | None:
        return None

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return host  # already in this device's memory

    def download(self, data: torch.Tensor) -> torch.Tensor:
        return data

    def synchronize(self, stream: object = None) -> None:
        pass

    def free_bytes(self) -> int | None:
        """Free device memory, where the device reports it (pool sizing); None on the host."""
        return None


class CudaEvent:
    """A CUDA event recorded on a stream."""

    def __init__(self, stream: torch.cuda.Stream):
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def wait(self, tensor: torch.Tensor) -> None:
        stream = torch.cuda.current_stream(tensor.device)
        stream.wait_event(self.event)
        tensor.record_stream(stream)  # produced on a side stream, consumed on this one


class CudaDevice(Device):
    """A CUDA device: pinned staging buffers, side-stream copies ordered by events."""

    host_memory = False

    def name(self) -> str:
        return torch.cuda.get_device_name(self.torch_device)

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)  # torch's caching host allocator reuses them

    @contextmanager
    def side_stream(self) -> Iterator[torch.cuda.Stream]:
        stream = torch.cuda.Stream(self.torch_device)
        with torch.cuda.stream(stream):
            yield stream

    def record(self, stream: torch.cuda.Stream | None = None) -> CudaEvent:
        return CudaEvent(stream or torch.cuda.current_stream(self.torch_device))

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.torch_device, non_blocking=True)

    def download(self, data: torch.Tensor) -> torch.Tensor:
        host = self.host_buffer(tuple(data.shape), data.dtype)
        host.copy_(data, non_blocking=True)
        data.record_stream(torch.cuda.current_stream(self.torch_device))
        return host

    def synchronize(self, stream: torch.cuda.Stream | None = None) -> None:
        (stream or torch.cuda.current_stream(self.torch_device)).synchronize()

    def free_bytes(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.torch_device)
        return free


def device_of(device: "Device | torch.device | str") -> Device:
    """The Device for a torch device (or the Device itself)."""
    if isinstance(device, Device):
        return device
    device = torch.device(device)
    return CudaDevice(device) if device.type == "cuda" else Device(device)


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU (the engine's and the store's `auto`)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
