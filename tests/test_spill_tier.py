"""The store's spill tiers (cache_store.spill): device -> host -> disk -> dropped, promotion on pull.

Pool-level rules first (eviction order, promotion, the index, corruption, pins, leases, bounds), then
a real store on a real gRPC port serving a working set four times its device pool."""

import errno
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cache_store.config import StoreConfig
from cache_store.metrics import StoreCollector
from cache_store.pool import StorePool
from cache_store.replicator import ReplicationCounters
from cache_store.service import ServiceCounters
from cache_store.spill import DiskSlots, SpillTier, make_tiers
from kvcluster.errors import InvalidArgument, ResourceExhausted
from tests.store_fixtures import (SMALL_LAYOUT, fingerprint_for, hashes_of, make_blocks, redis_index,  # noqa: F401
                                  redis_server, redis_url, store_config, store_factory, tail_block)
from tests.test_cache_store_pool import Clock, RecordingIndex, fill, pool_device, read_back  # noqa: F401

FP = fingerprint_for(SMALL_LAYOUT)
NBYTES = SMALL_LAYOUT.block_nbytes


def spill_pool(device_blocks: int, host_blocks: int, disk_blocks: int, disk_path: str = "",
               device="cpu", **kwargs) -> StorePool:
    pinned = getattr(device, "type", str(device)).startswith("cuda")
    tiers = make_tiers(SMALL_LAYOUT, host_blocks * NBYTES, disk_blocks * NBYTES, disk_path, pinned)
    return StorePool(SMALL_LAYOUT, device_blocks, device, tiers=tiers, **kwargs)


@pytest.fixture
def pools():
    made: list[StorePool] = []

    def make(*args, **kwargs) -> StorePool:
        made.append(spill_pool(*args, **kwargs))
        return made[-1]

    yield make
    for pool in made:
        pool.close()


def tiers_of(pool: StorePool, blocks) -> list[str | None]:
    return [pool.tier_of(block_hash) for block_hash in hashes_of(blocks)]


def test_evicted_blocks_go_down_device_host_disk_and_only_the_last_tier_drops(pools):
    index = RecordingIndex()
    pool, blocks = pools(2, 2, 3, index=index), make_blocks(SMALL_LAYOUT, 8)
    fill(pool, blocks)
    # least recently used lowest: block 0 fell out of the last tier
    assert tiers_of(pool, blocks) == [None, "disk", "disk", "disk", "host", "host", "device", "device"]
    assert index.events == [("add", h) for h in hashes_of(blocks[:7])] + [("remove", hashes_of(blocks)[0]),
                                                                           ("add", hashes_of(blocks)[7])]
    counters = pool.counters
    assert counters.evictions == 6 and counters.drops == {"disk": 1}
    assert counters.spills == {("device", "host"): 6, ("host", "disk"): 4}
    assert pool.lookup(FP, hashes_of(blocks[1:])) == 7 and pool.lookup(FP, hashes_of(blocks)) == 0
    assert set(pool.held_hashes()) == set(hashes_of(blocks[1:]))
    assert [(t.name, t.blocks_used, t.blocks_capacity) for t in pool.stats().tiers] == [
        ("device", 2, 2), ("host", 2, 2), ("disk", 3, 3)]


def test_a_tier_keeps_its_own_lru(pools):
    pool, blocks = pools(1, 2, 2), make_blocks(SMALL_LAYOUT, 4)
    fill(pool, blocks)                     # device [3], host [1, 2], disk [0]
    assert pool.store(hashes_of(blocks)[1], FP, *blocks[1], 30.0) is False  # a duplicate touches host's LRU
    fill(pool, make_blocks(SMALL_LAYOUT, 1, seed=9))
    assert tiers_of(pool, blocks) == ["disk", "host", "disk", "host"]  # 2, not the touched 1, went down


def test_a_pull_promotes_lower_tier_blocks_with_identical_bytes_and_drops_nothing(pools, pool_device):
    index = RecordingIndex()
    pool, blocks = pools(2, 2, 4, index=index, device=pool_device), make_blocks(SMALL_LAYOUT, 8)
    fill(pool, blocks)
    assert set(tiers_of(pool, blocks)) == {"device", "host", "disk"}
    for start in (0, 6, 2, 4, 0):  # 6 and 7 are in the host tier after the first pull
        keys = hashes_of(blocks)[start:start + 2]
        pinned, reason = pool.pin(FP, keys, owner="puller")
        assert reason == "" and [p.key for p in pinned] == keys
        assert pool.read(pinned) == [payload for _, payload in blocks[start:start + 2]]
        assert tiers_of(pool, blocks[start:start + 2]) == ["device", "device"]
        pool.release("puller")
    assert pool.counters.promotions["disk"] >= 2 and pool.counters.promotions["host"] >= 1
    assert pool.counters.drops == {} and pool.lookup(FP, hashes_of(blocks)) == 8
    assert [event for event, _ in index.events] == ["add"] * 8  # moving between tiers is not an index change


def test_promotion_swaps_through_the_freed_slot_so_a_full_hierarchy_loses_nothing(pools):
    pool, blocks = pools(1, 1, 1), make_blocks(SMALL_LAYOUT, 3)
    fill(pool, blocks)                     # disk [0], host [1], device [2]: every tier full
    for key, payload in [(header.block_hash, payload) for header, payload in blocks] * 2:
        assert read_back(pool, key) == payload
    assert pool.counters.drops == {} and sorted(filter(None, tiers_of(pool, blocks))) == ["device", "disk", "host"]


def test_the_index_hears_of_a_removal_only_when_a_block_leaves_the_last_tier(pools):
    index = RecordingIndex()
    pool, blocks = pools(1, 1, 0, index=index), make_blocks(SMALL_LAYOUT, 3)
    a, b, c = hashes_of(blocks)
    fill(pool, blocks[:2])
    assert index.events == [("add", a), ("add", b)] and pool.tier_of(a) == "host"
    fill(pool, blocks[2:])
    assert index.events[2:] == [("remove", a), ("add", c)] and pool.tier_of(a) is None


def test_a_corrupt_disk_slot_is_dropped_not_served(pools, tmp_path):
    index, path = RecordingIndex(), str(tmp_path / "spill.blocks")
    pool, blocks = pools(1, 0, 2, disk_path=path, index=index), make_blocks(SMALL_LAYOUT, 2)
    fill(pool, blocks)
    (a, b), (_, payload_b) = hashes_of(blocks), blocks[1]
    assert pool.tier_of(a) == "disk"
    with open(path, "r+b") as disk:  # flip one byte in every slot
        for slot in range(2):
            disk.seek(slot * NBYTES + 100)
            byte = disk.read(1)
            disk.seek(slot * NBYTES + 100)
            disk.write(bytes([byte[0] ^ 0x01]))
    pinned, reason = pool.pin(FP, [a, b], owner="puller")
    assert pinned == [] and "failed its checksum in the disk tier" in reason
    assert pool.counters.tier_checksum_failures == {"disk": 1} and pool.counters.drops == {"disk": 1}
    assert pool.tier_of(a) is None and index.events[-1] == ("remove", a) and pool.lookup(FP, [a]) == 0
    assert read_back(pool, b) == payload_b and pool.stats().pinned_blocks == 0
    assert [(t.name, t.blocks_used) for t in pool.stats().tiers] == [("device", 1), ("disk", 0)]


class FailingDisk(DiskSlots):
    """A disk tier whose writes or reads fail with EIO once `failing` is set."""

    failing = ""

    def write(self, slot, payload):
        if self.failing == "write":
            raise OSError(errno.EIO, "injected write error")
        super().write(slot, payload)

    def view(self, slot):
        if self.failing == "read":
            raise OSError(errno.EIO, "injected read error")
        return super().view(slot)


def test_a_failing_disk_drops_blocks_and_never_fails_a_push_or_a_pull(tmp_path):
    index, disk = RecordingIndex(), FailingDisk(4, NBYTES, str(tmp_path / "spill.blocks"))
    pool, blocks = StorePool(SMALL_LAYOUT, 1, index=index, tiers=[SpillTier("disk", disk)]), make_blocks(SMALL_LAYOUT, 4)
    try:
        fill(pool, blocks[:2])                                  # block 0 on disk
        disk.failing = "write"
        assert fill(pool, blocks[2:3]) == [True]                # block 1 cannot go down: dropped
        assert pool.tier_of(hashes_of(blocks)[1]) is None and index.events[-2] == ("remove", hashes_of(blocks)[1])
        disk.failing = "read"
        pinned, reason = pool.pin(FP, hashes_of(blocks)[:1], owner="puller")
        assert pinned == [] and "could not be read back" in reason and pool.tier_of(hashes_of(blocks)[0]) is None
        assert pool.counters.drops == {"device": 1, "disk": 1} and pool.counters.tier_checksum_failures == {}
        disk.failing = ""
        assert read_back(pool, hashes_of(blocks)[2]) == blocks[2][1] and pool.stats().pinned_blocks == 0
    finally:
        pool.close()


class GatedDisk(DiskSlots):
    """A disk tier whose reads wait for `proceed` once `gated` (signalling `reading` first)."""

    gated = False

    def __init__(self, *args):
        super().__init__(*args)
        self.reading, self.proceed = threading.Event(), threading.Event()

    def view(self, slot):
        if self.gated:
            self.reading.set()
            self.proceed.wait(10)
        return super().view(slot)


def test_concurrent_pulls_of_a_moving_block_wait_for_one_promotion(tmp_path):
    disk = GatedDisk(4, NBYTES, str(tmp_path / "spill.blocks"))
    pool, blocks = StorePool(SMALL_LAYOUT, 2, tiers=[SpillTier("disk", disk)]), make_blocks(SMALL_LAYOUT, 3)
    key, results = hashes_of(blocks)[0], {}

    def pull(name: str) -> None:
        pinned, reason = pool.pin(FP, [key], owner=name)
        results[name] = (pool.read(pinned), reason)
        pool.release(name)

    landed, waiting = pool._landed, threading.Event()

    class Watched:  # the pool's condition, telling the test when a pull starts waiting on it
        def wait_for(self, predicate, timeout):
            waiting.set()
            return landed.wait_for(predicate, timeout)

        def notify_all(self):
            landed.notify_all()

    pool._landed = Watched()
    try:
        fill(pool, blocks)  # block 0 on disk
        disk.gated = True
        first = threading.Thread(target=pull, args=("first",))
        first.start()
        assert disk.reading.wait(10)          # the first pull is promoting block 0: it is moving
        second = threading.Thread(target=pull, args=("second",))
        second.start()
        assert waiting.wait(10)               # the second pull reached the moving block and waits for it
        disk.proceed.set()
        first.join(10)
        second.join(10)
        assert results["first"] == results["second"] == ([blocks[0][1]], "")
        assert pool.counters.promotions == {"disk": 1} and pool.stats().pinned_blocks == 0
    finally:
        disk.proceed.set()
        pool.close()


def test_pinned_blocks_never_spill(pools):
    pool, blocks = pools(2, 4, 0), make_blocks(SMALL_LAYOUT, 5)
    fill(pool, blocks[:2])
    (pinned,), _ = pool.pin(FP, hashes_of(blocks)[:1], owner="slow-puller")
    fill(pool, blocks[2:])
    assert tiers_of(pool, blocks) == ["device", "host", "host", "host", "device"]
    assert pool.read([pinned]) == [blocks[0][1]]
    pool.release("slow-puller")


def test_resource_exhausted_and_lease_rules_hold_with_tiers(pools):
    clock = Clock()
    pool, blocks = pools(2, 4, 0, clock=clock), make_blocks(SMALL_LAYOUT, 4)
    tail_header, tail_payload = tail_block(SMALL_LAYOUT, "req-1")
    assert pool.store("req-1", FP, tail_header, tail_payload, 10.0)
    fill(pool, blocks[:3])                  # the tail block stays; full blocks go through the other slot
    assert tiers_of(pool, blocks[:3]) == ["host", "host", "device"]
    assert pool.stats().request_blocks == 1 and pool.stats().tiers[1].blocks_used == 2
    pool.pin(FP, hashes_of(blocks)[2:3], owner="holder")
    with pytest.raises(ResourceExhausted):  # pinned + leased: nothing on the device is evictable
        fill(pool, blocks[3:])
    pinned, reason = pool.pin(FP, hashes_of(blocks)[:1], owner="other")
    assert pinned == [] and "no device slot is free to promote it into" in reason
    assert pool.tier_of(hashes_of(blocks)[0]) == "host" and pool.lookup(FP, hashes_of(blocks)[:1]) == 1
    clock.now += 11                         # the lease ends: the tail block expires, it never spills
    assert read_back(pool, hashes_of(blocks)[0]) == blocks[0][1]
    assert pool.stats().request_blocks == 0 and pool.counters.lease_expiries == 1
    assert len(pool.held_hashes()) == 3 and pool.counters.spills == {("device", "host"): 2}
    pool.release("holder")


def test_the_disk_file_is_preallocated_bounded_and_removed_on_close(tmp_path):
    path = tmp_path / "spill.blocks"
    pool = spill_pool(2, 1, 3, disk_path=str(path))
    assert path.stat().st_size == 3 * NBYTES
    for seed in range(6):  # 60 blocks through a hierarchy of 6, many pulled back up
        blocks = make_blocks(SMALL_LAYOUT, 10, seed=seed)
        fill(pool, blocks)
        for header, payload in blocks[-5:]:
            assert read_back(pool, header.block_hash) == payload
        assert path.stat().st_size == 3 * NBYTES
    assert pool.counters.spills[("host", "disk")] > 0 and pool.counters.drops["disk"] > 0
    pool.close()
    assert not path.exists()


def test_tier_settings_are_checked_at_start(tmp_path):
    with pytest.raises(InvalidArgument, match="host_tier_bytes"):
        StoreConfig(host_tier_bytes=-1)
    with pytest.raises(InvalidArgument, match="disk_tier_bytes"):
        StoreConfig(disk_tier_bytes=-5)
    with pytest.raises(InvalidArgument, match="disk_tier_bytes.*holds no block"):
        make_tiers(SMALL_LAYOUT, 0, NBYTES - 1)
    with pytest.raises(InvalidArgument, match="disk_tier_path.*cannot create"):
        make_tiers(SMALL_LAYOUT, 0, NBYTES, str(tmp_path / "no-such-dir" / "spill.blocks"))
    defaults = StoreConfig()
    assert (defaults.host_tier_bytes, defaults.disk_tier_bytes) == (0, 0) and make_tiers(SMALL_LAYOUT, 0, 0) == []


def test_a_store_process_with_an_unwritable_disk_tier_path_refuses_to_start(tmp_path):
    path = tmp_path / "no-such-dir" / "spill.blocks"
    result = subprocess.run([sys.executable, "-m", "cache_store", "--port", "0", "--metrics-port", "-1",
                             "--redis-url", "", "--device", "cpu", "--capacity-bytes", str(1 << 20),
                             "--disk-tier-bytes", str(1 << 20), "--disk-tier-path", str(path)],
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2 and "READY" not in result.stdout
    assert "disk_tier_path" in result.stderr and "cannot create" in result.stderr


def test_concurrent_pulls_through_the_tiers_serve_only_exact_bytes_and_leak_nothing(pools):
    pool, blocks = pools(4, 6, 6), make_blocks(SMALL_LAYOUT, 16)
    fill(pool, blocks)
    payloads = dict(zip(hashes_of(blocks), (payload for _, payload in blocks)))
    served, errors = [0], []

    def puller(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(60):
                start = rng.randrange(16)
                keys = hashes_of(blocks)[start:start + rng.randint(1, 2)]
                pinned, _ = pool.pin(FP, keys, owner=(seed, i))
                for block, payload in zip(pinned, pool.read(pinned)):
                    assert payload == payloads[block.key]
                    served[0] += 1
                pool.release((seed, i))
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=puller, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and served[0] > 50
    stats = pool.stats()
    assert stats.pinned_blocks == 0 and pool.counters.drops == {}
    assert sum(tier.blocks_used for tier in stats.tiers) == len(pool.held_hashes()) == 16


def test_tier_metrics(pools):
    pool = pools(1, 1, 1)
    fill(pool, make_blocks(SMALL_LAYOUT, 4))
    registry = CollectorRegistry()
    registry.register(StoreCollector(pool, ServiceCounters(), _NoPublisher(), _NoWatchdog(), ReplicationCounters()))
    value = registry.get_sample_value
    assert [value("kvcluster_store_tier_blocks_used", {"tier": t}) for t in ("device", "host", "disk")] == [1, 1, 1]
    assert value("kvcluster_store_tier_blocks_capacity", {"tier": "disk"}) == 1
    assert value("kvcluster_store_tier_spills_total", {"from_tier": "device", "to_tier": "host"}) == 3
    assert value("kvcluster_store_tier_spills_total", {"from_tier": "host", "to_tier": "disk"}) == 2
    assert value("kvcluster_store_tier_drops_total", {"tier": "disk"}) == 1
    assert value("kvcluster_store_tier_promotions_total", {"tier": "disk"}) == 0
    assert value("kvcluster_store_tier_checksum_failures_total", {"tier": "host"}) == 0


class _NoPublisher:
    epoch = errors = 0


class _NoWatchdog:
    cancelled = 0


def test_a_store_serves_a_working_set_four_times_its_pool(redis_url, redis_index, store_factory, tmp_path):
    path = tmp_path / "store-spill.blocks"
    store, client = store_factory(store_config(redis_url, blocks=8, host_tier_bytes=12 * NBYTES,
                                               disk_tier_bytes=12 * NBYTES, disk_tier_path=str(path)))
    blocks = make_blocks(SMALL_LAYOUT, 32)
    payloads = dict(zip(hashes_of(blocks), (payload for _, payload in blocks)))
    assert client.push_blocks(FP, blocks).num_stored == 32
    assert client.lookup(FP, hashes_of(blocks)) == 32
    assert store.flush_index() and len(redis_index.lookup(hashes_of(blocks))) == 32
    rng = random.Random(7)
    order = [range(0, 32, 4), range(28, -1, -4), [rng.randrange(0, 29) for _ in range(12)]]
    for start in (s for starts in order for s in starts):
        keys = hashes_of(blocks)[start:start + 4]
        result = client.pull_blocks(FP, keys)
        assert result.stop_reason == "" and [p for _, p in result.blocks] == [payloads[k] for k in keys]
    stats = store.pool.stats()
    assert stats.counters.promotions.get("disk", 0) > 0 and stats.counters.promotions.get("host", 0) > 0
    assert stats.counters.drops == {} and stats.pinned_blocks == 0 and path.stat().st_size == 12 * NBYTES
    assert store.flush_index() and len(redis_index.lookup(hashes_of(blocks))) == 32
