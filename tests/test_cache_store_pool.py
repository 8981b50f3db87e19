"""StorePool: slots, LRU order, pins with owners, leases, generations, thread safety, CUDA.

The data path (store, pin, read, concurrently too) runs on the host, on a stand-in accelerator (the
CUDA sequence of staging buffers, side streams and events on CPU: tests/device_stand_in.py) and, where
there is one, on a GPU."""

import threading

import pytest
import torch

from cache_store.pool import StorePool
from kvcluster.errors import IntegrityError, InvalidArgument, ResourceExhausted
from tests.device_stand_in import StandInAccelerator
from tests.store_fixtures import SMALL_LAYOUT, fingerprint_for, hashes_of, make_blocks, tail_block

FP = fingerprint_for(SMALL_LAYOUT)
OTHER_FP = fingerprint_for(SMALL_LAYOUT, b"another-model")


class RecordingIndex:
    """An IndexSink that keeps what the pool reported, in order."""

    def __init__(self):
        self.events: list[tuple[str, bytes]] = []

    def blocks_added(self, block_hashes):
        self.events += [("add", h) for h in block_hashes]

    def blocks_removed(self, block_hashes):
        self.events += [("remove", h) for h in block_hashes]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fill(pool: StorePool, blocks, lease_s: float = 30.0) -> list[bool]:
    return [pool.store(header.block_hash or header.request_key, FP, header, payload, lease_s)
            for header, payload in blocks]


def touch(pool: StorePool, block_hash: bytes) -> None:
    """Pull-like use: pin then release."""
    pool.pin(FP, [block_hash], owner="toucher")
    pool.release("toucher")


def read_back(pool: StorePool, key) -> bytes:
    (pinned,), _ = pool.pin(FP, [key], owner="reader")
    try:
        return pool.read([pinned])[0]
    finally:
        pool.release("reader")


@pytest.fixture(params=["cpu", "stand-in", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def pool_device(request):
    return StandInAccelerator() if request.param == "stand-in" else request.param


def test_store_then_read_is_bitwise_identical_and_a_duplicate_takes_no_slot(pool_device):
    pool, blocks = StorePool(SMALL_LAYOUT, 4, pool_device), make_blocks(SMALL_LAYOUT, 3)
    assert fill(pool, blocks) == [True] * 3
    assert fill(pool, blocks) == [False] * 3
    assert pool.stats().blocks_used == 3
    assert all(read_back(pool, header.block_hash) == payload for header, payload in blocks)


def test_capacity_comes_from_the_byte_budget():
    pool = StorePool.from_budget(SMALL_LAYOUT, 10 * SMALL_LAYOUT.block_nbytes + 100)
    assert pool.num_blocks == 10 and pool.stats().bytes_capacity == 10 * SMALL_LAYOUT.block_nbytes
    with pytest.raises(InvalidArgument, match="capacity_bytes"):
        StorePool.from_budget(SMALL_LAYOUT, SMALL_LAYOUT.block_nbytes - 1)


def test_lru_evicts_the_least_recently_pulled_block_and_reports_it():
    index = RecordingIndex()
    pool, blocks = StorePool(SMALL_LAYOUT, 3, index=index), make_blocks(SMALL_LAYOUT, 5)
    a, b, c, d, e = hashes_of(blocks)
    fill(pool, blocks[:3])
    touch(pool, a)                    # order of use now: b, c, a
    fill(pool, blocks[3:4])           # evicts b
    assert pool.lookup(FP, [b]) == 0 and pool.lookup(FP, [a]) == pool.lookup(FP, [c]) == 1
    touch(pool, c)                    # order: a, d, c
    fill(pool, blocks[4:5])           # evicts a
    assert pool.lookup(FP, [a]) == 0 and pool.lookup(FP, [d]) == 1
    assert [h for kind, h in index.events if kind == "remove"] == [b, a]
    assert [h for kind, h in index.events if kind == "add"] == [a, b, c, d, e]
    assert pool.stats().counters.evictions == 2


def test_a_pinned_block_survives_pressure_and_full_plus_pinned_is_exhausted():
    pool, blocks = StorePool(SMALL_LAYOUT, 2), make_blocks(SMALL_LAYOUT, 4)
    a, b, c, d = hashes_of(blocks)
    fill(pool, blocks[:2])
    pool.pin(FP, [a], owner="stream-1")       # a is the oldest, but pinned
    fill(pool, blocks[2:3])                   # evicts b, not a
    assert pool.lookup(FP, [a]) == 1 and pool.lookup(FP, [b]) == 0
    pool.pin(FP, [c], owner="stream-2")
    with pytest.raises(ResourceExhausted, match="all 2 blocks are pinned"):
        fill(pool, blocks[3:4])
    assert pool.stats().pinned_blocks == 2
    pool.release("stream-1")
    assert fill(pool, blocks[3:4]) == [True]  # a was released, so it could be evicted
    assert pool.lookup(FP, [a]) == 0 and pool.lookup(FP, [c]) == 1


def test_releasing_an_owner_drops_all_its_pins_once():
    pool, blocks = StorePool(SMALL_LAYOUT, 4), make_blocks(SMALL_LAYOUT, 3)
    fill(pool, blocks)
    pinned, reason = pool.pin(FP, hashes_of(blocks), owner="o")
    pool.pin(FP, hashes_of(blocks)[:1], owner="p")
    assert len(pinned) == 3 and reason == ""
    assert pool.stats().pinned_blocks == 3
    pool.release("o")
    pool.release("o")  # idempotent: a second release must not unpin p's block
    assert pool.stats().pinned_blocks == 1
    pool.release("p")
    assert pool.stats().pinned_blocks == 0


def test_pin_stops_at_the_first_block_not_held_or_under_another_fingerprint():
    pool, blocks = StorePool(SMALL_LAYOUT, 4), make_blocks(SMALL_LAYOUT, 3)
    fill(pool, blocks[:1] + blocks[2:])
    pinned, reason = pool.pin(FP, hashes_of(blocks), owner="o")
    assert len(pinned) == 1 and reason.startswith("block 1 ") and "not held" in reason
    pinned, reason = pool.pin(OTHER_FP, hashes_of(blocks), owner="o")
    assert pinned == [] and "another fingerprint" in reason
    assert pool.lookup(OTHER_FP, hashes_of(blocks)) == 0
    pool.release("o")


def test_a_request_block_is_freed_by_a_completed_pull_only():
    pool = StorePool(SMALL_LAYOUT, 2)
    header, payload = tail_block(SMALL_LAYOUT, "req-1")
    assert pool.store("req-1", FP, header, payload, 30.0)
    pool.pin(FP, ["req-1"], owner="cancelled")
    pool.release("cancelled")                      # a cancelled pull keeps it
    assert pool.stats().request_blocks == 1
    (pinned,), _ = pool.pin(FP, ["req-1"], owner="complete")
    assert pool.read([pinned]) == [payload]
    pool.release("complete", consumed=True)
    assert pool.stats().request_blocks == 0 and pool.stats().blocks_used == 0


def test_request_blocks_expire_with_their_lease_but_not_while_pinned():
    clock = Clock()
    pool = StorePool(SMALL_LAYOUT, 4, clock=clock)
    for key, lease in (("short", 1.0), ("long", 60.0)):
        header, payload = tail_block(SMALL_LAYOUT, key)
        pool.store(key, FP, header, payload, lease)
    pool.pin(FP, ["short"], owner="puller")
    clock.now += 2
    assert pool.expire_leases() == 0               # pinned: being pulled right now
    pool.release("puller")
    clock.now += 2
    assert pool.expire_leases() == 1
    assert pool.stats().request_blocks == 1 and pool.lookup(FP, []) == 0
    assert pool.pin(FP, ["short"], owner="late")[0] == []
    assert pool.stats().counters.lease_expiries == 1


def test_expired_leases_are_reclaimed_when_the_pool_is_full():
    clock = Clock()
    pool, blocks = StorePool(SMALL_LAYOUT, 1, clock=clock), make_blocks(SMALL_LAYOUT, 1)
    header, payload = tail_block(SMALL_LAYOUT, "req")
    pool.store("req", FP, header, payload, 5.0)
    with pytest.raises(ResourceExhausted):
        fill(pool, blocks)                         # a leased block is not evictable
    clock.now += 6
    assert fill(pool, blocks) == [True]


def test_a_request_key_reused_with_other_bytes_is_an_integrity_error():
    pool = StorePool(SMALL_LAYOUT, 2)
    first, second = tail_block(SMALL_LAYOUT, "req", seed=1), tail_block(SMALL_LAYOUT, "req", seed=2)
    assert pool.store("req", FP, *first, 30.0)
    assert not pool.store("req", FP, *first, 30.0)
    with pytest.raises(IntegrityError, match="different checksum"):
        pool.store("req", FP, *second, 30.0)


def test_a_discarded_block_disappears_at_once_and_frees_its_slot_on_release():
    index = RecordingIndex()
    pool, blocks = StorePool(SMALL_LAYOUT, 2, index=index), make_blocks(SMALL_LAYOUT, 1)
    fill(pool, blocks)
    (pinned,), _ = pool.pin(FP, hashes_of(blocks), owner="o")
    pool.discard(pinned)
    assert pool.lookup(FP, hashes_of(blocks)) == 0 and pool.stats().blocks_used == 1
    pool.release("o")
    assert pool.stats().blocks_used == 0
    assert index.events[-1] == ("remove", hashes_of(blocks)[0])


def test_a_reused_slot_gets_a_new_generation():
    pool, blocks = StorePool(SMALL_LAYOUT, 1), make_blocks(SMALL_LAYOUT, 2)
    fill(pool, blocks[:1])
    (first,), _ = pool.pin(FP, hashes_of(blocks)[:1], owner="o")
    pool.release("o")
    fill(pool, blocks[1:])
    (second,), _ = pool.pin(FP, hashes_of(blocks)[1:], owner="o")
    assert second.slot == first.slot and second.generation == first.generation + 1
    pool.release("o")


def test_concurrent_pushes_pins_and_releases_keep_the_books_straight(pool_device):
    pool, blocks = StorePool(SMALL_LAYOUT, 8, pool_device), make_blocks(SMALL_LAYOUT, 32)
    errors = []

    def worker(worker_id: int) -> None:
        try:
            for round_ in range(40):
                header, payload = blocks[(worker_id * 7 + round_) % len(blocks)]
                try:
                    pool.store(header.block_hash, FP, header, payload, 30.0)
                except ResourceExhausted:
                    pass
                owner = (worker_id, round_)
                for pinned in pool.pin(FP, [header.block_hash], owner)[0]:
                    assert pool.read([pinned]) == [payload]
                pool.release(owner)
        except Exception as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = pool.stats()
    assert stats.pinned_blocks == 0 and stats.blocks_used == len(pool.held_hashes()) <= 8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pool_lives_on_the_gpu_and_round_trips_bitwise():
    pool, blocks = StorePool(SMALL_LAYOUT, 8, device="cuda"), make_blocks(SMALL_LAYOUT, 4)
    assert pool.device.type == "cuda"
    fill(pool, blocks)
    assert all(read_back(pool, header.block_hash) == payload for header, payload in blocks)


def test_read_views_give_the_same_bytes_as_read_and_host_pools_are_not_copied(pool_device):
    pool, blocks = StorePool(SMALL_LAYOUT, 4, pool_device), make_blocks(SMALL_LAYOUT, 3)
    fill(pool, blocks)
    pinned, _ = pool.pin(FP, hashes_of(blocks), "reader")
    try:
        views = pool.read_views(pinned)
        assert [bytes(view) for view in views] == pool.read(pinned) == [payload for _, payload in blocks]
        assert all(view.readonly for view in views)  # a sender can never write into the pool through one
        if pool_device == "cpu":  # a view of the slot itself: the pool's next write shows through it
            pool._kv.kv.view(torch.uint8).view(4, -1)[pinned[0].slot, 0] ^= 0xFF
            assert views[0][0] == blocks[0][1][0] ^ 0xFF
    finally:
        pool.release("reader")
