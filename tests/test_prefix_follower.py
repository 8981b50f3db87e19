"""The gateway's local copy of the decode registry (gateway.prefix_follower) answers as Redis does,
through adds, evictions, a restart under a new epoch and a replica leaving (real redis-server)."""

import random

import pytest

from gateway.prefix_follower import PrefixFollower
from kvcluster.cli.polling import wait_until
from kvcluster.kv.index import RedisIndex, worker_namespace
from tests.cluster_fixtures import running_redis


@pytest.fixture
def index():
    with running_redis() as server:
        redis_index = RedisIndex(server.url, worker_namespace("t29f", "decode"), kv_events=True)
        yield redis_index
        redis_index.close()


def live(index: RedisIndex, ids: set[str]):
    return [m for m in index.live_stores() if m.store_id in ids]


def test_follower_agrees_with_redis_through_adds_removes_restarts_and_leaves(index):
    rng = random.Random(3)
    hashes = [rng.randbytes(16) for _ in range(40)]
    epochs = {w: index.register(w, f"127.0.0.1:{i}", ttl_s=30) for i, w in enumerate(("a", "b", "c"))}
    index.add_entries("a", epochs["a"], hashes[:30])
    index.add_entries("b", epochs["b"], hashes[:10])
    follower = PrefixFollower(index)
    members = live(index, {"a", "b", "c"})
    follower.sync(members)                                   # snapshots
    prompts = [hashes, hashes[:12], hashes[5:]]

    def agree(members):
        for prompt in prompts:
            assert follower.held_prefix(prompt, members) == index.held_prefix(prompt, members)

    agree(members)
    assert follower.held_prefix(hashes, members) == [30, 10, 0]
    index.add_entries("c", epochs["c"], hashes[:20])         # events
    index.remove_entries("a", epochs["a"], hashes[3:4])
    index.add_entries("b", epochs["b"], hashes[10:35])
    follower.sync(members)
    agree(members)
    assert follower.held_prefix(hashes, members) == [3, 35, 20]
    epochs["b"] = index.register("b", "127.0.0.1:1", ttl_s=30)  # a restart: the old epoch's entries go
    index.add_entries("b", epochs["b"], hashes[:2])
    members = live(index, {"a", "b", "c"})
    follower.sync(members)
    agree(members)
    assert follower.held_prefix(hashes, members) == [3, 2, 20]
    index.deregister("c", epochs["c"])                      # c leaves
    members = live(index, {"a", "b"})
    follower.sync(members)
    agree(members)
    assert follower.prefix_index.held_prefix(hashes[:20], live(index, {"a"})) == [3]
    assert follower.restarts == 1 and follower.events_applied > 0


def test_a_follower_behind_the_trimmed_stream_starts_over(index):
    epoch = index.register("a", "127.0.0.1:1", ttl_s=30)
    follower = PrefixFollower(index)
    follower.sync(live(index, {"a"}))
    hashes = [bytes([i]) * 16 for i in range(8)]
    index.add_entries("a", epoch, hashes)
    index.redis.xtrim(index.key("events"), maxlen=0)        # what EVENTS_MAXLEN does to a slow follower
    index.add_entries("a", epoch, hashes[:1])               # one event it can see, after a gap
    follower.sync(live(index, {"a"}))
    assert follower.restarts == 2
    assert follower.held_prefix(hashes, live(index, {"a"})) == [8]


def test_gateway_with_a_local_routing_index_credits_replicas_as_redis_does():
    import asyncio

    from gateway.config import GatewayConfig
    from gateway.openai_api import ApiRequest
    from gateway.server import Gateway
    from kvcluster.kv.blocks import prefix_hashes

    fingerprint = bytes(range(16))
    ids = [(7 * i) % 1000 + 5 for i in range(16 * 6)]  # 6 blocks
    hashes = prefix_hashes(fingerprint, ids, 16)
    request = ApiRequest(chat=False, model="m", prompt_ids=ids)

    async def overlaps_by_replica(gateway: Gateway) -> dict[str, int]:
        await gateway.refresh()
        replicas = sorted(gateway.replicas.up(), key=lambda r: r.replica_id)
        return dict(zip([r.replica_id for r in replicas], gateway.overlaps(request, replicas)[1]))

    async def scenario(redis_url: str) -> list[tuple[dict, dict]]:
        index = RedisIndex(redis_url, worker_namespace("gw29", "decode"), kv_events=True)
        epochs = {w: index.register(w, f"127.0.0.1:{60000 + i}", ttl_s=30, layout="kvlayout-v1:L1:B16:H1:D2:float32",
                                    fingerprint=fingerprint.hex()) for i, w in enumerate(("a", "b"))}
        for w in epochs:  # as a decode worker registers: its block size is a field of its own
            index.publish_load(w, {"block_size": 16})
        gateways = [Gateway(GatewayConfig(redis_url=redis_url, index_namespace="gw29", routing_index=where))
                    for where in ("redis", "local")]
        seen = []
        index.add_entries("a", epochs["a"], hashes[:4])
        seen.append(tuple([await overlaps_by_replica(g) for g in gateways]))
        index.add_entries("b", epochs["b"], hashes)               # after the local copy's snapshot: an event
        index.remove_entries("a", epochs["a"], hashes[1:2])
        seen.append(tuple([await overlaps_by_replica(g) for g in gateways]))
        assert gateways[0].follower is None and gateways[1].follower.events_applied > 0
        for gateway in gateways:
            await gateway.replicas.close()
        index.close()
        return seen

    with running_redis() as server:
        (first_redis, first_local), (then_redis, then_local) = asyncio.run(scenario(server.url))
    assert first_redis == first_local == {"a": 4, "b": 0}
    assert then_redis == then_local == {"a": 1, "b": 6}


def test_only_an_index_that_publishes_kv_events_writes_the_stream(index):
    """Stores and prefill workers (kv_events off, the default) never grow `{ns}:events`."""
    quiet = RedisIndex(index_url(index), "t29q")
    try:
        epoch = quiet.register("s", "127.0.0.1:1", ttl_s=30)
        quiet.add_entries("s", epoch, [bytes(16), bytes([1]) * 16])
        quiet.remove_entries("s", epoch, [bytes(16)])
        assert quiet.redis.exists(quiet.key("events")) == 0
        epoch = index.register("w", "127.0.0.1:2", ttl_s=30)
        index.add_entries("w", epoch, [bytes(16)])
        index.remove_entries("w", epoch, [bytes(16)])
        assert [op for _, _, _, op, _ in index.read_events("0-0")] == ["add", "remove"]
    finally:
        quiet.close()


def index_url(index: RedisIndex) -> str:
    kwargs = index.redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


@pytest.mark.slow
def test_a_live_cluster_routing_on_the_local_index_sends_a_repeat_to_the_replica_holding_it():
    """`--routing-index local` end to end (two decode replicas, the gateway following the KV events):
    a repeated prompt goes to a replica holding it, finds it in its local pool and answers as cold."""
    import time

    import httpx
    import openai

    from kvcluster.kv.blocks import prefix_hashes
    from tests.cluster_fixtures import gateway_cluster

    documents = [[100 + (37 * i + 5_003 * d) % 40_000 for i in range(16 * 8)] for d in range(3)]  # 8 blocks each
    with gateway_cluster(("--routing-index", "local", "--refresh-seconds", "0.2")) as cluster:
        client = openai.OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)
        index = RedisIndex(cluster.redis_url, worker_namespace("kvc", "decode"))

        def ask(ids: list[int]) -> tuple[str, str, int]:
            reply = client.completions.create(model=cluster.served_model, prompt=ids, max_tokens=4, temperature=0)
            return reply.choices[0].text, reply.usage.kvcluster["replica"], reply.usage.kvcluster["local_cache_tokens"]

        def gateway_metric(sample: str) -> float:
            text = httpx.get(f"{cluster.gateway_url}/metrics", timeout=10).text
            found = [line for line in text.splitlines() if line.startswith(sample + " ")]
            return float(found[0].split()[-1]) if found else 0.0

        def cache_hits() -> float:
            return gateway_metric('kvcluster_gateway_routing_decisions_total{reason="cache_hit"}')

        try:
            cold = [ask(ids) for ids in documents]
            assert all(local == 0 for _, _, local in cold)
            fingerprint, block_size = next(bytes.fromhex(m.fingerprint) for m in index.live_stores()), 16
            for ids, (_, replica, _) in zip(documents, cold):
                hashes = prefix_hashes(fingerprint, ids, block_size)
                for _ in range(100):  # the replica's publisher writes its blocks to the index shortly after
                    held = dict(zip([m.store_id for m in index.live_stores()],
                                    index.held_prefix(hashes, index.live_stores())))
                    if held.get(replica) == len(hashes):
                        break
                    time.sleep(0.1)
                assert held[replica] == len(hashes)
            # The gateway's copy credits each replica with its documents' blocks (a refresh every 0.2 s).
            owed = {replica: 8 * sum(r == replica for _, r, _ in cold) for _, replica, _ in cold}
            assert wait_until(lambda: all(
                gateway_metric(f'kvcluster_gateway_local_index_blocks{{replica="{replica}"}}') >= blocks
                for replica, blocks in owed.items()), 30)
            hits = cache_hits()
            for ids, (text, replica, _) in zip(documents, cold):
                for _ in range(2):
                    warm_text, warm_replica, local = ask(ids)
                    assert warm_text == text
                    assert warm_replica == replica and local == len(ids) - 1
            assert cache_hits() == hits + 2 * len(documents)
        finally:
            index.close()


def test_gateway_queues_a_routed_prompts_uncached_tokens_on_its_replica_until_the_first_token():
    """What cache_aware weighs as load: a request adds its uncached prompt tokens to the chosen
    replica's queued_prefill_tokens when routed and takes them off at its first response."""
    import asyncio

    from gateway.config import GatewayConfig
    from gateway.openai_api import ApiRequest
    from gateway.server import Gateway
    from kvcluster.kv.blocks import prefix_hashes
    from kvcluster.proto import decode_pb2

    fingerprint = bytes(range(16))
    ids = [(11 * i) % 1000 + 5 for i in range(16 * 5 + 3)]  # 5 full blocks and 3 tokens
    request = ApiRequest(chat=False, model="m", prompt_ids=ids)

    class Call:
        def __init__(self, replica, seen: list):
            self.replica, self.seen = replica, seen

        async def _responses(self):
            self.seen.append(self.replica.queued_prefill_tokens)      # prefill pending
            yield decode_pb2.GenerateResponse(token_ids=[7])
            self.seen.append(self.replica.queued_prefill_tokens)      # after the first token
            yield decode_pb2.GenerateResponse(token_ids=[8], finish_reason=decode_pb2.FINISH_REASON_LENGTH)

        def __aiter__(self):
            return self._responses()

        def cancel(self):
            pass

    async def scenario(redis_url: str) -> tuple[str, int, list, dict, int]:
        index = RedisIndex(redis_url, worker_namespace("gw29q", "decode"), kv_events=True)
        epochs = {w: index.register(w, f"127.0.0.1:{61000 + i}", ttl_s=30, layout="kvlayout-v1:L1:B16:H1:D2:float32",
                                    fingerprint=fingerprint.hex()) for i, w in enumerate(("a", "b"))}
        for w in epochs:  # as a decode worker registers: its block size is a field of its own
            index.publish_load(w, {"block_size": 16})
        index.add_entries("b", epochs["b"], prefix_hashes(fingerprint, ids, 16)[:3])  # b holds 48 tokens
        gateway = Gateway(GatewayConfig(redis_url=redis_url, index_namespace="gw29q"))
        await gateway.refresh()
        seen: list = []
        for replica in gateway.replicas.up():
            replica.stub = type("Stub", (), {"Generate": lambda _, *a, r=replica, **k: Call(r, seen)})()
        route = await gateway.route(request, set())
        pieces = [piece async for piece in gateway.generate(request)]
        after = {r.replica_id: r.queued_prefill_tokens for r in gateway.replicas.up()}
        await gateway.replicas.close()
        index.close()
        return route.replica.replica_id, route.queued_tokens, seen, after, len(pieces)

    with running_redis() as server:
        chosen, queued, seen, after, pieces = asyncio.run(scenario(server.url))
    assert chosen == "b" and queued == len(ids) - 48
    assert seen == [len(ids) - 48, 0] and after == {"a": 0, "b": 0} and pieces == 2


def test_the_copy_counts_each_members_blocks_as_routing_reads_them():
    from kvcluster.kv.prefix_index import PrefixIndex

    index = PrefixIndex()
    a, b = index.sink("a"), index.sink("b")
    a.blocks_added([b"1", b"2", b"3"])
    b.blocks_added([b"2", b"3"])
    a.blocks_removed([b"3"])
    assert index.blocks_by_member() == {"a": 2, "b": 2} and index.num_blocks == 3
    index.drop_member("b")
    assert index.blocks_by_member() == {"a": 2, "b": 0}
