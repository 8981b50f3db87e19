"""The index beyond one Redis. On a Sentinel group (a real primary, replica and three Sentinels on
loopback ports, kvcluster.cli.redis_server.SentinelGroup): `redis+sentinel://` URLs, a primary killed under
lookups (every answer right or Unavailable, never wrong; the index usable again once a replica is
promoted), and `kvcluster up --redis-mode sentinel` serving warm == cold through the gateway before and
after its primary is killed under load, with no failed request. On a real Redis Cluster of 3 masters with a
replica each (`--redis-mode cluster`): a prompt served from the cache store found through the cluster's
index, a master killed -9 under load with no failed request and the same tokens, its replica promoted and
the index usable again (tests/test_index.py runs every index rule on a 3-master cluster too)."""

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import redis

from gateway.config import GatewayConfig
from gateway.replicas import ReplicaSet
from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.cli.redis_server import ClusterGroup, SentinelGroup
from kvcluster.errors import Unavailable
from kvcluster.kv.index import RedisIndex, StoreRef, redis_client, worker_namespace

FAILOVER_DEADLINE_S = 60.0  # bound of the polls below (down-after 1 s + election); not a timing claim


@pytest.mark.parametrize("url, field", [
    ("redis+sentinel://127.0.0.1:26379", "SERVICE"),
    ("redis+sentinel:///kvc", "SERVICE"),
    ("redis+sentinel://127.0.0.1/kvc", "HOST:PORT"),
    ("redis+sentinel://127.0.0.1:x/kvc", "HOST:PORT"),
    ("redis+cluster://", "Cluster URL"),
    ("redis+cluster://127.0.0.1:7000/0", "Cluster URL"),
    ("redis+cluster://127.0.0.1", "HOST:PORT"),
])
def test_a_malformed_sentinel_url_is_refused_naming_the_form(url, field):
    with pytest.raises(ValueError, match=field):
        redis_client(url)


def test_a_sentinel_url_carries_the_service_password_and_db():
    client = redis_client("redis+sentinel://:s3cret@127.0.0.1:1,127.0.0.1:2/svc/3")
    pool = client.connection_pool
    assert pool.service_name == "svc" and pool.connection_kwargs["password"] == "s3cret"
    assert pool.connection_kwargs["db"] == 3
    assert [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
            for c in pool.sentinel_manager.sentinels] == [("127.0.0.1", 1), ("127.0.0.1", 2)]


def wait_until(predicate, deadline_s: float = FAILOVER_DEADLINE_S):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if value := predicate():
                return value
        except (Unavailable, redis.RedisError):
            pass
        time.sleep(0.1)
    raise AssertionError("condition not reached before the deadline")


def replica_has(group: SentinelGroup, key: str) -> bool:
    replica = next(s for s in group.servers if s.port != group.primary_address()[1])
    client = redis.Redis(host="127.0.0.1", port=replica.port, socket_timeout=1.0)
    try:
        return bool(client.exists(key))
    finally:
        client.close()


def test_the_index_survives_its_primary_dying_under_lookups():
    hashes = [bytes([i]) * 16 for i in range(8)]
    with SentinelGroup() as group:
        index = RedisIndex(group.url)
        try:
            epoch = index.register("s1", "127.0.0.1:9", ttl_s=60)
            index.add_entries("s1", epoch, hashes)
            assert [ref.store_id for ref in index.lookup(hashes)] == ["s1"] * 8
            wait_until(lambda: replica_has(group, index.key("blk", hashes[-1].hex())))
            answers, stop = {"right": 0, "unavailable": 0, "wrong": []}, threading.Event()

            def look() -> None:
                while not stop.is_set():
                    try:
                        holders = [ref.store_id for ref in index.lookup(hashes)]
                    except Unavailable:
                        answers["unavailable"] += 1
                        time.sleep(0.02)
                        continue
                    if holders == ["s1"] * 8:
                        answers["right"] += 1
                    else:
                        answers["wrong"].append(holders)

            reader = threading.Thread(target=look)
            reader.start()
            old = group.primary()
            wait_until(lambda: answers["right"] > 0)
            old.stop()
            new_port = wait_until(lambda: group.primary_address()[1] != old.port and group.primary_address()[1])
            before = answers["right"]
            wait_until(lambda: answers["right"] > before + 5)
            stop.set()
            reader.join(10)
            assert answers["wrong"] == [] and new_port != old.port
            # Writes go to the promoted replica: a new store registers and is found.
            epoch2 = index.register("s2", "127.0.0.1:10", ttl_s=60)
            index.add_entries("s2", epoch2, [bytes([99]) * 16])
            assert [ref.store_id for ref in index.lookup([bytes([99]) * 16])] == ["s2"]
        finally:
            index.close()


def chat_client(cluster: Cluster):
    client = openai.OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="none", max_retries=0, timeout=120)

    def ask(text: str) -> tuple[str, int]:
        reply = client.chat.completions.create(model=cluster.served_model, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": text}])
        return reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens
    return ask


QUESTION = "Name three rivers of Europe and one city on each. " + " ".join(
    f"Context line {i}: the archive holds {i * 7} maps." for i in range(12))


@contextlib.contextmanager
def warm_cluster(redis_mode: str, scheme: str):
    """`kvcluster up --redis-mode <redis_mode>` with the gateway, QUESTION asked cold then warm (same
    text, the warm one cached): yields the cluster, its `ask` and the cold answer."""
    with open("/dev/null", "w") as quiet, Cluster(ClusterPorts.any_free(), dtype="float32", gateway=True,
                                                  redis_mode=redis_mode, log_stream=quiet) as cluster:
        assert cluster.redis_url.startswith(f"{scheme}://")
        ask = chat_client(cluster)
        cold, cold_cached = ask(QUESTION)
        warm, warm_cached = ask(QUESTION)
        assert warm == cold and cold_cached == 0 and warm_cached > 0
        yield cluster, ask, cold


def reset_prefix_cache(cluster: Cluster) -> None:
    """Drop the decode worker's own prefix cache: a cached prompt must now come from the store."""
    assert httpx.post(f"{cluster.gateway_url}/reset_prefix_cache", timeout=30).status_code == 200


@pytest.mark.slow
def test_kvcluster_up_on_a_redis_cluster_serves_from_the_store_through_a_master_failover():
    with warm_cluster("cluster", "redis+cluster") as (cluster, ask, cold):
        # Without the decode worker's own copy, the blocks come from the store, found through the
        # cluster's index (lookups spread over its shards).
        reset_prefix_cache(cluster)
        stores = RedisIndex(cluster.redis_url)
        try:
            assert len(stores.live_stores()) == 1
        finally:
            stores.close()
        from_store, store_cached = ask(QUESTION)
        assert from_store == cold and store_cached > 0
        group: ClusterGroup = cluster.redis
        victim = 1                                         # a master; its replica is the server after the masters
        replica = next(i for i, master in group.replica_of.items() if master == victim)
        assert group.servers[victim].port in group.master_ports()
        questions = [f"{QUESTION} Variant {i}." for i in range(4)] + [QUESTION]
        with ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(ask, q) for q in questions]
            group.servers[victim].kill()                   # kill -9 a master under load
            answers = [future.result() for future in pending]  # raises on any failed request
        assert all(text for text, _ in answers) and answers[-1][0] == cold
        # Its replica is promoted: a master serving the dead one's slots, the dead one flagged failed.
        wait_until(lambda: group.servers[replica].port in group.master_ports())
        dead = next(n for n in group.nodes() if n["port"] == group.servers[victim].port)
        assert "fail" in dead["flags"] and dead["slots"] == 0
        assert len(group.master_ports()) == group.masters
        # The index works again: a new prompt is indexed and, the decode worker's copy dropped, served
        # warm from the store with the same tokens (its blocks spread over every shard, the promoted one too).
        fresh = "After the failover: " + QUESTION

        def warm_from_store():
            first = ask(fresh)
            reset_prefix_cache(cluster)
            second = ask(fresh)
            return second[1] > 0 and second[0] == first[0]
        wait_until(warm_from_store)
        # Exact throughout: what was answered during the failover is what is answered now.
        assert [ask(q)[0] for q in questions] == [text for text, _ in answers]


@pytest.mark.slow
def test_kvcluster_up_on_sentinel_serves_warm_equal_cold_through_a_primary_failover():
    question = QUESTION
    with warm_cluster("sentinel", "redis+sentinel") as (cluster, ask, cold):
        group: SentinelGroup = cluster.redis
        old = group.primary()
        questions = [f"{question} Variant {i}." for i in range(6)]
        with ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(ask, q) for q in questions]
            old.stop()                                     # under load
            answers = [future.result() for future in pending]  # raises on any failed request
        assert len(answers) == 6 and all(text for text, _ in answers)
        wait_until(lambda: group.primary_address()[1] != old.port)
        stores, decodes = RedisIndex(cluster.redis_url), RedisIndex(cluster.redis_url, worker_namespace("kvc", "decode"))
        try:  # the store and the decode worker are live in the promoted primary's index
            wait_until(lambda: stores.live_stores() and decodes.live_stores())
        finally:
            stores.close()
            decodes.close()
        # The index works again: a new prompt computed after the failover is found warm, same tokens.
        fresh = "After the failover: " + question

        def warm_again():
            first = ask(fresh)
            second = ask(fresh)
            return second[1] > 0 and second[0] == first[0]
        wait_until(warm_again)


def test_an_unknown_redis_mode_is_refused():
    with pytest.raises(ValueError, match="redis_mode"):
        Cluster(ClusterPorts.any_free(), redis_mode="shards")


def test_an_empty_registry_listing_keeps_the_rotation_a_smaller_one_shrinks_it():
    """A Redis failover that loses the heartbeats lists no replica for a moment: the gateway keeps
    routing to the replicas it had (a user saw 503s before); a listing that names some drops the rest."""
    async def scenario() -> None:  # the replicas' grpc.aio channels need a running loop
        replicas = ReplicaSet(GatewayConfig(redis_url=""))
        a, b = StoreRef("a", "127.0.0.1:1", 1), StoreRef("b", "127.0.0.1:2", 1)
        replicas.apply([(a, {}), (b, {})])
        assert sorted(replicas.replicas) == ["a", "b"]
        replicas.apply([])
        assert sorted(r.replica_id for r in replicas.up()) == ["a", "b"]
        replicas.apply([(b, {})])
        assert sorted(replicas.replicas) == ["b"]
        await replicas.close()

    asyncio.run(scenario())
