"""The cache store over real gRPC (port 0) with a real redis-server: every 'Must show' of issue 4."""

import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from kvcluster.cli.redis_server import RedisServer
from kvcluster.kv.blocks import checksum
from kvcluster.kv.index import RedisIndex, group_runs, pick_store
from kvcluster.proto import cache_pb2
from kvcluster.rpc.store_client import push_requests
from tests.store_fixtures import (BIG_LAYOUT, SMALL_LAYOUT, SMOLLM2_LAYOUT, fingerprint_for, hashes_of, held_pull,
                                  make_blocks, redis_index, redis_server, redis_url, store_config,  # noqa: F401
                                  store_factory, tail_block, wait_until)

FP = fingerprint_for(SMALL_LAYOUT)
STORED, DUPLICATE, REJECTED = (cache_pb2.BlockPushResult.STORED, cache_pb2.BlockPushResult.DUPLICATE,
                               cache_pb2.BlockPushResult.REJECTED)


def payloads(blocks) -> list[bytes]:
    return [payload for _, payload in blocks]


def test_one_block_round_trips_bitwise(redis_url, store_factory):
    store, client = store_factory(store_config(redis_url))
    blocks = make_blocks(SMALL_LAYOUT, 1)
    assert client.push_blocks(FP, blocks).num_stored == 1
    pulled = client.pull_blocks(FP, hashes_of(blocks))
    assert payloads(pulled.blocks) == payloads(blocks) and pulled.stop_reason == ""
    header = pulled.blocks[0][0]
    assert list(header.token_ids) == list(blocks[0][0].token_ids)
    assert (header.store_id, header.store_address) == (store.store_id, store.address)


def test_64_smollm2_blocks_round_trip_bitwise_and_a_duplicate_push_stores_once(redis_url, store_factory):
    fingerprint = fingerprint_for(SMOLLM2_LAYOUT)
    store, client = store_factory(store_config(redis_url, SMOLLM2_LAYOUT, blocks=64))
    blocks = make_blocks(SMOLLM2_LAYOUT, 64, fingerprint=fingerprint)
    assert SMOLLM2_LAYOUT.block_nbytes == 737_280
    first = client.push_blocks(fingerprint, blocks)
    assert (first.num_stored, first.num_duplicate, first.num_rejected) == (64, 0, 0)
    pulled = client.pull_blocks(fingerprint, hashes_of(blocks))
    assert pulled.num_blocks_sent == 64 and payloads(pulled.blocks) == payloads(blocks)
    again = client.push_blocks(fingerprint, blocks)
    assert again.num_duplicate == 64 and {r.status for r in again.results} == {DUPLICATE}
    assert client.stats().blocks_used == 64


def test_blocks_split_into_small_chunks_round_trip(redis_url, store_factory):
    _, client = store_factory(store_config(redis_url))
    blocks = make_blocks(SMALL_LAYOUT, 3)
    assert client.push_blocks(FP, blocks, max_chunk_bytes=100).num_stored == 3
    assert payloads(client.pull_blocks(FP, hashes_of(blocks), max_chunk_bytes=100).blocks) == payloads(blocks)


def test_lru_evicts_the_least_recently_pulled_block_and_its_index_entry_goes(redis_url, store_factory, redis_index):
    store, client = store_factory(store_config(redis_url, blocks=4))
    blocks = make_blocks(SMALL_LAYOUT, 5)
    a, b, c, d, e = hashes_of(blocks)
    client.push_blocks(FP, blocks[:4])
    for key in (b, a, d):                      # c is now the least recently used
        client.pull_blocks(FP, [key])
    client.push_blocks(FP, blocks[4:])
    assert [client.lookup(FP, [key]) for key in (a, b, c, d, e)] == [1, 1, 0, 1, 1]
    assert store.flush_index()
    assert redis_index.lookup([c]) == []
    assert not redis_index.redis.exists(f"kvc:blk:{c.hex()}")
    assert [h.store_id for h in redis_index.lookup([a, b])] == [store.store_id] * 2
    assert client.stats().evictions == 1


def test_a_pinned_block_survives_pressure_and_full_plus_pinned_is_resource_exhausted(redis_url, store_factory):
    fingerprint = fingerprint_for(BIG_LAYOUT)
    _, client = store_factory(store_config(redis_url, BIG_LAYOUT, blocks=2))
    blocks = make_blocks(BIG_LAYOUT, 4, fingerprint=fingerprint)
    a, b, c, d = hashes_of(blocks)
    client.push_blocks(fingerprint, blocks[:2])
    with held_pull(client.target, fingerprint, [a]):
        client.push_blocks(fingerprint, blocks[2:3])          # evicts b, the only unpinned block
        assert client.lookup(fingerprint, [a]) == 1 and client.lookup(fingerprint, [b]) == 0
        with held_pull(client.target, fingerprint, [c]):
            assert client.stats().pinned_blocks == 2
            with pytest.raises(grpc.RpcError) as failure:
                client.push_blocks(fingerprint, blocks[3:4])
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "pinned" in failure.value.details()
    assert wait_until(lambda: client.stats().pinned_blocks == 0)
    assert client.push_blocks(fingerprint, blocks[3:4]).num_stored == 1


def test_a_cancelled_pull_returns_the_pin_count_to_zero(redis_url, store_factory):
    fingerprint = fingerprint_for(BIG_LAYOUT)
    _, client = store_factory(store_config(redis_url, BIG_LAYOUT, blocks=4))
    blocks = make_blocks(BIG_LAYOUT, 4, fingerprint=fingerprint)
    client.push_blocks(fingerprint, blocks)
    with held_pull(client.target, fingerprint, hashes_of(blocks)) as call:
        assert client.stats().pinned_blocks == 4
        call.cancel()
        assert wait_until(lambda: client.stats().pinned_blocks == 0)
    assert client.pull_blocks(fingerprint, hashes_of(blocks)).num_blocks_sent == 4  # nothing leaked


def test_a_wrong_checksum_is_rejected_with_its_reason_and_never_visible(redis_url, store_factory):
    _, client = store_factory(store_config(redis_url))
    blocks = make_blocks(SMALL_LAYOUT, 3)
    blocks[1][0].checksum ^= 1
    response = client.push_blocks(FP, blocks)
    assert [r.status for r in response.results] == [STORED, REJECTED, STORED]
    assert "checksum mismatch" in response.results[1].reason
    assert response.results[1].block.block_hash == blocks[1][0].block_hash
    assert client.lookup(FP, hashes_of(blocks)) == 1 and client.stats().blocks_used == 2


def test_a_fingerprint_the_store_does_not_accept_is_rejected(redis_url, store_factory):
    _, client = store_factory(store_config(redis_url, fingerprint=FP.hex()))
    other = fingerprint_for(SMALL_LAYOUT, b"other-model")
    with pytest.raises(grpc.RpcError) as failure:
        client.push_blocks(other, make_blocks(SMALL_LAYOUT, 2, fingerprint=other))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "open.fingerprint" in failure.value.details() and FP.hex() in failure.value.details()
    assert client.stats().blocks_used == 0 and client.stats().fingerprint == FP


def test_a_pull_under_another_fingerprint_gets_nothing(redis_url, store_factory):
    _, client = store_factory(store_config(redis_url))
    tail = tail_block(SMALL_LAYOUT, "req-9")
    client.push_blocks(FP, [tail])
    pulled = client.pull_blocks(fingerprint_for(SMALL_LAYOUT, b"other-model"), ["req-9"])
    assert pulled.num_blocks_sent == 0 and "another fingerprint" in pulled.stop_reason


def test_a_wrong_layout_is_rejected_with_both_layouts_named(redis_url, store_factory):
    _, client = store_factory(store_config(redis_url))
    wrong = BIG_LAYOUT
    requests = push_requests(FP, wrong, make_blocks(wrong, 1))
    with pytest.raises(grpc.RpcError) as failure:
        client.stub.PushBlocks(requests)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "open.layout" in failure.value.details() and wrong.canonical() in failure.value.details()
    assert client.stats().blocks_used == 0


def test_a_truncated_block_fails_the_push_and_nothing_half_written_shows(redis_url, store_factory):
    _, client = store_factory(store_config(redis_url))
    blocks = make_blocks(SMALL_LAYOUT, 2)
    requests = list(push_requests(FP, SMALL_LAYOUT, blocks, max_chunk_bytes=128))[:-1]  # drop the last chunk
    with pytest.raises(grpc.RpcError) as failure:
        client.stub.PushBlocks(iter(requests))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated" in failure.value.details()
    assert client.lookup(FP, hashes_of(blocks)[1:]) == 0
    assert client.stats().blocks_used == 1  # the complete first block only


def test_a_short_block_is_rejected_on_its_own(redis_url, store_factory):
    _, client = store_factory(store_config(redis_url))
    (header, payload), good = make_blocks(SMALL_LAYOUT, 2)
    header.checksum = checksum(payload[:-8])
    response = client.push_blocks(FP, [(header, payload[:-8]), good])
    assert [r.status for r in response.results] == [REJECTED, STORED]
    assert f"needs {SMALL_LAYOUT.block_nbytes}" in response.results[0].reason


def test_a_stale_index_entry_makes_the_pull_report_a_shorter_run(redis_url, store_factory, redis_index):
    store, client = store_factory(store_config(redis_url, blocks=4))
    blocks = make_blocks(SMALL_LAYOUT, 5)
    hashes = hashes_of(blocks)
    client.push_blocks(FP, blocks[:4])
    assert store.flush_index()
    holders = redis_index.lookup(hashes)       # the index says 4 are held ...
    assert len(holders) == 4
    for key in (hashes[0], hashes[1], hashes[3]):
        client.pull_blocks(FP, [key])
    client.push_blocks(FP, blocks[4:])         # ... then block 2 is evicted
    pulled = client.pull_blocks(FP, hashes[:4])
    assert pulled.num_blocks_sent == 2 and payloads(pulled.blocks) == payloads(blocks[:2])
    assert "block 2" in pulled.stop_reason and "not held" in pulled.stop_reason


def test_a_restarted_store_removes_its_old_entries(redis_url, store_factory, redis_index):
    first, client = store_factory(store_config(redis_url, store_id="restart-me"))
    blocks = make_blocks(SMALL_LAYOUT, 4)
    client.push_blocks(FP, blocks)
    assert first.flush_index() and len(redis_index.lookup(hashes_of(blocks))) == 4
    old_epoch = client.stats().epoch
    first.stop(grace_s=0, deregister=False)    # as a crash would leave it
    assert redis_index.redis.hexists(f"kvc:blk:{hashes_of(blocks)[0].hex()}", "restart-me")
    second, client = store_factory(store_config(redis_url, store_id="restart-me"))
    assert second.flush_index()
    assert client.stats().epoch == old_epoch + 1
    assert redis_index.lookup(hashes_of(blocks)) == []
    assert not any(redis_index.redis.exists(f"kvc:blk:{h.hex()}") for h in hashes_of(blocks))


def test_a_dead_stores_entries_are_ignored(redis_url, store_factory, redis_index):
    dying, client = store_factory(store_config(redis_url, store_id="dying", heartbeat_ttl_seconds=1.0))
    alive, _ = store_factory(store_config(redis_url, store_id="alive"))
    blocks = make_blocks(SMALL_LAYOUT, 3)
    client.push_blocks(FP, blocks)
    assert dying.flush_index() and alive.flush_index()
    assert [h.store_id for h in redis_index.lookup(hashes_of(blocks))] == ["dying"] * 3
    dying.stop(grace_s=0, deregister=False)    # no more heartbeats
    assert wait_until(lambda: not redis_index.redis.exists("kvc:alive:dying"), timeout_s=5)
    assert redis_index.redis.exists(f"kvc:blk:{hashes_of(blocks)[0].hex()}")
    assert redis_index.lookup(hashes_of(blocks)) == []
    assert [s.store_id for s in redis_index.live_stores()] == ["alive"]


def test_two_shards_share_the_blocks_and_a_prefix_is_pulled_across_both(redis_url, store_factory, redis_index):
    shards = [store_factory(store_config(redis_url, store_id=name)) for name in ("shard-a", "shard-b")]
    clients = {store.address: client for store, client in shards}
    assert all(store.flush_index() for store, _ in shards)
    live = redis_index.live_stores()
    blocks = make_blocks(SMALL_LAYOUT, 24)
    placement = {header.block_hash: pick_store(header.block_hash, live) for header, _ in blocks}
    for target in live:
        mine = [block for block in blocks if placement[block[0].block_hash] == target]
        assert mine, "rendezvous hashing left a shard empty"
        assert clients[target.address].push_blocks(FP, mine).num_stored == len(mine)
    assert all(store.flush_index() for store, _ in shards)
    holders = redis_index.lookup(hashes_of(blocks))
    assert [h.store_id for h in holders] == [placement[h].store_id for h in hashes_of(blocks)]
    pulled = []
    for run in group_runs(holders):
        result = clients[run.store.address].pull_blocks(FP, hashes_of(blocks)[run.start:run.end])
        assert result.num_blocks_sent == run.end - run.start
        pulled += payloads(result.blocks)
    assert pulled == payloads(blocks)


def test_a_request_scoped_block_is_never_indexed_and_is_freed_by_its_pull(redis_url, store_factory, redis_index):
    store, client = store_factory(store_config(redis_url))
    tail = tail_block(SMALL_LAYOUT, "req-1")
    assert client.push_blocks(FP, [tail]).num_stored == 1
    assert store.flush_index() and redis_index.redis.keys("kvc:blk:*") == []
    assert client.stats().request_blocks == 1
    assert payloads(client.pull_blocks(FP, ["req-1"]).blocks) == [tail[1]]
    assert client.stats().request_blocks == 0
    assert client.pull_blocks(FP, ["req-1"]).num_blocks_sent == 0


def test_a_request_scoped_block_is_freed_when_its_lease_ends(redis_url, store_factory):
    _, client = store_factory(store_config(redis_url))
    client.push_blocks(FP, [tail_block(SMALL_LAYOUT, "req-2")], lease_seconds=1)
    assert client.stats().request_blocks == 1
    assert wait_until(lambda: client.stats().request_blocks == 0, timeout_s=5)
    assert client.pull_blocks(FP, ["req-2"]).num_blocks_sent == 0


def test_the_store_serves_without_redis_and_republishes_when_it_returns(store_factory):
    with RedisServer() as redis:
        store, client = store_factory(store_config(redis.url))
        index = RedisIndex(redis.url)
        blocks = make_blocks(SMALL_LAYOUT, 4)
        client.push_blocks(FP, blocks[:2])
        assert store.flush_index()
        redis.stop()
        assert client.push_blocks(FP, blocks[2:]).num_stored == 2
        assert payloads(client.pull_blocks(FP, hashes_of(blocks)).blocks) == payloads(blocks)
        redis.start()                          # back, empty, on the same port
        assert wait_until(lambda: store.flush_index() and len(index.lookup(hashes_of(blocks))) == 4)
        index.close()


def test_invalid_requests_are_invalid_argument_naming_field_and_limit(redis_url, store_factory):
    _, client = store_factory(store_config(redis_url))
    bad_calls = {
        "fingerprint": lambda: client.lookup(b"short", []),
        "max_chunk_bytes": lambda: client.pull_blocks(FP, [b"x" * 16], max_chunk_bytes=(1 << 20) + 1),
        "open.lease_seconds": lambda: client.push_blocks(FP, make_blocks(SMALL_LAYOUT, 1), lease_seconds=10**6),
        "block_hashes": lambda: client.lookup(FP, [b"x" * 16] * 5000),
    }
    for field, call in bad_calls.items():
        with pytest.raises(grpc.RpcError) as failure:
            call()
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert failure.value.details().startswith(field), failure.value.details()


def test_health_reports_serving_for_the_store_and_overall(redis_url, store_factory):
    store, client = store_factory(store_config(redis_url))
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "kvcluster.v1.CacheStore"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    store.rpc_server.set_serving(False)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_metrics_are_scraped_over_http_and_move(redis_url, store_factory):
    store, client = store_factory(store_config(redis_url, metrics_port=0))
    blocks = make_blocks(SMALL_LAYOUT, 3)
    blocks[2][0].checksum ^= 1
    client.push_blocks(FP, blocks)
    client.pull_blocks(FP, hashes_of(blocks))
    client.lookup(FP, hashes_of(blocks))
    with urllib.request.urlopen(f"http://127.0.0.1:{store.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    value = lambda name, **labels: samples[(name, tuple(sorted(labels.items())))]  # noqa: E731
    block = SMALL_LAYOUT.block_nbytes
    assert value("kvcluster_store_blocks_used") == 2 and value("kvcluster_store_blocks_capacity") == 16
    assert value("kvcluster_store_bytes_used") == 2 * block and value("kvcluster_store_bytes_capacity") == 16 * block
    assert value("kvcluster_store_lookups_total") == 2
    assert value("kvcluster_store_hit_blocks_total") == 4 and value("kvcluster_store_miss_blocks_total") == 2
    assert value("kvcluster_store_checksum_failures_total") == 1
    assert value("kvcluster_store_evictions_total") == 0 and value("kvcluster_store_pinned_blocks") == 0
    assert value("kvcluster_transfer_bytes_total", direction="push") == 3 * block
    assert value("kvcluster_transfer_bytes_total", direction="pull") == 2 * block
    assert value("kvcluster_transfer_seconds_total", direction="pull") > 0
    assert value("kvcluster_store_index_epoch") >= 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_store_keeps_its_pool_on_the_gpu(redis_url, store_factory):
    fingerprint = fingerprint_for(SMOLLM2_LAYOUT)
    store, client = store_factory(store_config(redis_url, SMOLLM2_LAYOUT, blocks=64, device="cuda"))
    blocks = make_blocks(SMOLLM2_LAYOUT, 64, fingerprint=fingerprint)
    assert client.push_blocks(fingerprint, blocks).num_stored == 64
    assert store.pool.device.type == "cuda" and client.stats().device.startswith("cuda")
    assert payloads(client.pull_blocks(fingerprint, hashes_of(blocks)).blocks) == payloads(blocks)
