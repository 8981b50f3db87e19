"""An accelerator stand-in on CPU, for tests: the CUDA transfer sequence with its asynchrony.

kvcluster.kv.device.CudaDevice stages through host buffers, queues copies on side streams and orders
their consumers with events. This stand-in takes the same path (it is not host memory) on CPU
tensors, and its copies are asynchronous in the way that matters: `upload` and `download` return a
buffer full of 0xFF and queue the copy, which lands only when an event recorded after it is waited
for, or its stream is synchronised. Code that reads a transfer without waiting reads garbage.

What it cannot stand in for, and so is only checked on a GPU (`make gpu-check`): page-locked memory
(its host buffers are ordinary, and counted), streams running concurrently with compute, and
record_stream's bookkeeping in the CUDA caching allocator.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from kvcluster.kv.device import Device


class StandInEvent:
    """The copies queued before it; waiting lands them."""

    def __init__(self, copies: list[Callable[[], None]]):
        self.copies = copies
        self.waited = False

    def wait(self, tensor: torch.Tensor) -> None:
        for copy in self.copies:
            copy()
        self.copies, self.waited = [], True


class StandInAccelerator(Device):
    """A device whose memory is not host memory and whose copies land late (see the module docstring)."""

    host_memory = False

    def __init__(self):
        super().__init__("cpu")
        self.queued: list[Callable[[], None]] = []  # one queue for every thread's streams: landing a copy early is
        self._lock = threading.Lock()               # what a device may do; losing one is not
        self.host_buffers = 0
        self.streams = 0

    def name(self) -> str:
        return "stand-in accelerator"

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        with self._lock:
            self.host_buffers += 1
        return torch.empty(shape, dtype=dtype)

    @contextmanager
    def side_stream(self) -> Iterator[str]:
        self.streams += 1
        yield "side"

    def record(self, stream: object = None) -> StandInEvent:
        with self._lock:
            copies, self.queued = self.queued, []
        return StandInEvent(copies)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return self._queue_copy(host, torch.empty_like(host))

    def download(self, data: torch.Tensor) -> torch.Tensor:
        return self._queue_copy(data, self.host_buffer(tuple(data.shape), data.dtype))

    def synchronize(self, stream: object = None) -> None:
        self.record().wait(torch.empty(0))

    def _queue_copy(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target.view(torch.uint8).fill_(0xFF)
        with self._lock:
            self.queued.append(lambda: target.copy_(source))
        return target
