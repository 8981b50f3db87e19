"""The device abstraction (kvcluster.kv.device): the KV pools, the block transfers and the store's pool
run the accelerator's sequence (staging buffers, side-stream copies, events) on CPU through a
stand-in whose copies land only when waited for (tests/device_stand_in.py says what it cannot
stand in for); the real CUDA device is checked where one exists (`make gpu-check`)."""

import pytest
import torch

from cache_store.pool import StorePool
from kvcluster.kv.block_io import batch_from_payloads, batch_to_payloads
from kvcluster.kv.device import CudaDevice, Device, default_device, device_of
from kvcluster.kv.pool import KVLayout, KVPool
from kvcluster.proto import common_pb2
from tests.device_stand_in import StandInAccelerator

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")


def filled_pool(device, seed: int, blocks: int = 8) -> KVPool:
    pool = KVPool(LAYOUT, blocks, device)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(seed)).to(pool.kv.dtype))
    return pool


def block_bytes(pool: KVPool, slot: int) -> bytes:
    return pool.kv[slot].cpu().contiguous().view(torch.uint8).numpy().tobytes()


def test_the_device_of_a_torch_device():
    cpu, cuda = device_of("cpu"), device_of("cuda:1")  # naming a CUDA device touches no GPU
    assert type(cpu) is Device and cpu.host_memory and cpu.record() is None and cpu.free_bytes() is None
    assert isinstance(cuda, CudaDevice) and not cuda.host_memory and cuda.torch_device == torch.device("cuda:1")
    assert device_of(cuda) is cuda
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_blocks_cross_a_stand_in_accelerator_through_staging_and_events():
    device = StandInAccelerator()
    source, target = filled_pool(device, seed=1), KVPool(LAYOUT, 8, device)
    payloads = batch_to_payloads(source.read([5, 1, 6]))  # gather, event, download on a side stream, sync
    assert payloads == [block_bytes(source, s) for s in (5, 1, 6)]
    staged = batch_from_payloads(payloads, LAYOUT.block_nbytes, device)
    assert staged.keep_alive is not None and device.host_buffers == 2  # one staging buffer each way
    assert bool((staged.data == 0xFF).all())  # the upload has not landed: nothing waited for it yet
    target.write([0, 7, 3], staged)            # the pool's write waits for the event first
    assert staged.ready.waited
    assert [block_bytes(target, s) for s in (0, 7, 3)] == payloads
    assert block_bytes(target, 1) == bytes(LAYOUT.block_nbytes)  # nothing else written


def test_one_block_in_and_out_of_a_stand_in_pool():
    device = StandInAccelerator()
    pool = filled_pool(device, seed=2)
    payload = pool.export_block(4)  # not host memory: the staged path, not a view of the pool
    assert payload == block_bytes(pool, 4) and device.host_buffers == 1
    pool.import_block(2, payload)
    assert block_bytes(pool, 2) == payload


def test_the_store_pool_on_a_stand_in_accelerator():
    device = StandInAccelerator()
    store = StorePool(LAYOUT, 4, device)
    payloads = [bytes([i]) * LAYOUT.block_nbytes for i in (7, 9)]
    for i, payload in enumerate(payloads):
        assert store.store(bytes([i]) * 16, b"fp", common_pb2.BlockRef(), payload, lease_s=30)
    pinned, why = store.pin(b"fp", [bytes([0]) * 16, bytes([1]) * 16], owner="puller")
    assert why == "" and store.read(pinned) == payloads  # one gather, one download for both
    assert device.host_buffers == 3  # two single-block pushes staged, one read
    store.release("puller")


def test_a_cpu_pool_reads_in_place_without_staging():
    pool = filled_pool("cpu", seed=3)
    staged = batch_from_payloads([pool.export_block(1)], LAYOUT.block_nbytes, pool.ops)
    assert staged.keep_alive is None and staged.ready is None  # a view of the payload, nothing queued


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_device_stages_through_pinned_memory_and_events():
    device = device_of("cuda")
    pool = filled_pool(device, seed=4)
    payloads = batch_to_payloads(pool.read([3, 0]))
    staged = batch_from_payloads(payloads, LAYOUT.block_nbytes, device)
    assert staged.keep_alive.is_pinned() and staged.data.is_cuda and staged.ready is not None
    pool.write([6, 7], staged)
    assert [block_bytes(pool, s) for s in (6, 7)] == payloads
    assert device.free_bytes() > 0 and device.name()
