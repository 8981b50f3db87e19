"""The worker registry (decode and prefill workers in Redis, with load and cached blocks), the
local pool's stored/removed events, and the choices built on them: the gateway's router, whether
it sends a replica token ids or text, and decode's choice of prefill replica. Real Redis; the model's
tokenizer, no weights."""

import asyncio
import json
from dataclasses import dataclass

import pytest

from decode_service.prefill_pool import NoPrefillReplica, PrefillPool
from gateway.config import GatewayConfig
from gateway.openai_api import ApiError, ApiRequest, parse_request
from gateway.replicas import Replica
from gateway.router import Router
from gateway.server import Gateway
from kvcluster.kv.block_manager import BlockManager
from kvcluster.kv.blocks import prefix_hashes
from kvcluster.kv.index import RedisIndex, StoreRef, worker_namespace
from kvcluster.kv.index_publisher import IndexPublisher
from kvcluster.model.tokenizer import ChatMessage
from tests.cluster_fixtures import running_redis
from tests.store_fixtures import wait_until

FINGERPRINT = bytes(range(16))


@pytest.fixture(scope="module")
def redis_url():
    with running_redis() as server:
        yield server.url


class RecordingSink:
    def __init__(self):
        self.events = []

    def blocks_added(self, hashes):
        self.events.append(("added", list(hashes)))

    def blocks_removed(self, hashes):
        self.events.append(("removed", list(hashes)))


def test_pool_reports_registered_and_evicted_blocks():
    pool = BlockManager(num_blocks=2)
    pool.listener = sink = RecordingSink()
    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    slots = pool.allocate(2)
    assert pool.register(a, slots[0]) and pool.register(b, slots[1]) and not pool.register(a, slots[1])
    pool.free(slots)                       # both stay cached (evictable)
    new = pool.allocate(1)                 # evicts the least recently used: a
    pool.register(c, new[0])
    assert sink.events == [("added", [a]), ("added", [b]), ("removed", [a]), ("added", [c])]
    assert sorted(pool.cached_hashes()) == sorted([b, c])


def test_registry_counts_each_workers_leading_blocks_and_drops_the_dead(redis_url):
    index = RedisIndex(redis_url, worker_namespace("t1", "decode"))
    hashes = prefix_hashes(FINGERPRINT, list(range(64)), 16)  # 4 blocks
    epoch_a = index.register("a", "127.0.0.1:1", ttl_s=30, layout="kvlayout-v1:L1:B16:H1:D2:float32",
                             fingerprint=FINGERPRINT.hex())
    epoch_b = index.register("b", "127.0.0.1:2", ttl_s=0.3)
    index.add_entries("a", epoch_a, hashes[:3])
    index.add_entries("b", epoch_b, hashes[:1] + hashes[2:])  # a gap after the first block
    index.publish_load("a", {"running": 3, "waiting": 1, "free_blocks": 7})
    members = index.live_stores()
    assert [m.store_id for m in members] == ["a", "b"]
    assert index.held_prefix(hashes, members) == [3, 1]
    assert index.member_fields(["a", "b"]) == [{"running": "3", "waiting": "1", "free_blocks": "7"}, {}]
    # b's heartbeat lapses (its TTL is 0.3 s): it leaves the listing and its entries stop counting
    assert wait_until(lambda: [m.store_id for m in index.live_stores()] == ["a"], timeout_s=10, interval_s=0.02)
    assert index.held_prefix(hashes, members) == [3, 0]
    index.close()


def test_publisher_publishes_load_with_the_heartbeat_and_blocks_in_batches(redis_url):
    index = RedisIndex(redis_url, worker_namespace("t2", "decode"))
    hashes = prefix_hashes(FINGERPRINT, list(range(48)), 16)
    held = [hashes[0]]  # the pool's contents: a snapshot on (re)registration covers changes queued before it
    publisher = IndexPublisher(RedisIndex(redis_url, worker_namespace("t2", "decode")), "w", "127.0.0.1:9", 0.1, 1.0,
                               held_hashes=lambda: list(held), load=lambda: {"running": 2, "waiting": 0, "free_blocks": 5})
    publisher.start()
    try:
        held.extend(hashes[1:])
        publisher.blocks_added(hashes[1:])
        assert publisher.flush()
        members = index.live_stores()
        assert index.held_prefix(hashes, members) == [3]
        publisher.blocks_removed(hashes[2:])
        assert publisher.flush()
        assert index.held_prefix(hashes, members) == [2]
        assert index.member_fields(["w"])[0]["running"] == "2"
    finally:
        publisher.stop()
    assert index.live_stores() == []  # deregistered on a graceful stop
    index.close()


@dataclass
class FakeReplica:
    replica_id: str
    load: int = 0
    published_load: int = 0
    queued_prefill_tokens: int = 0
    block_size: int = 16


def test_router_weighs_cached_prefix_against_queued_prefill():
    router = Router("cache_aware", overlap_weight=1.0)
    a, b = FakeReplica("a", load=2, queued_prefill_tokens=64), FakeReplica("b", load=0)
    route = router.pick([a, b], [5, 0], prompt_tokens=100)
    assert route.replica is a and route.reason == "cache_hit" and route.queued_tokens == 100 - 5 * 16
    route = router.pick([a, b], [3, 0], prompt_tokens=100)  # 48 cached tokens are not worth 64 queued ones
    assert route.replica is b and route.queued_tokens == 100
    assert router.pick([a, b], [4, 0], prompt_tokens=100).replica is b  # 64 = 64: fewer open requests wins
    route = router.pick([a, b], [0, 0])
    assert route.replica is b and route.reason == "least_loaded"
    a.queued_prefill_tokens = a.load = 0
    a.published_load = 4  # busy with other clients' work: ties go to the other one
    assert router.pick([a, b], [0, 0]).replica is b
    herding = Router("cache_aware", overlap_weight=2.0)  # a cached token worth two queued ones
    a.queued_prefill_tokens = 64
    assert herding.pick([a, b], [3, 0], prompt_tokens=100).replica is a
    least = Router("least_loaded")
    a.queued_prefill_tokens, a.load, b.load = 0, 1, 2
    assert least.pick([a, b], [0, 0]).replica is a
    rr = Router("round_robin", overlap_weight=1.0)
    assert [rr.pick([a, b], [9, 0]).replica.replica_id for _ in range(4)] == ["a", "b", "a", "b"]


@dataclass(frozen=True)
class PoolConfig:
    redis_url: str
    prefill_target: str = ""
    index_namespace: str = "t3"
    registry_heartbeat_seconds: float = 1.0

    def channel_credentials(self):
        return None

    def outgoing_metadata(self):
        return ()


def test_decode_picks_the_least_loaded_registered_prefill_replica(redis_url):
    index = RedisIndex(redis_url, worker_namespace("t3", "prefill"))
    for member, load, fingerprint in (("p1", 3, FINGERPRINT), ("p2", 1, FINGERPRINT), ("p3", 0, b"x" * 16)):
        index.register(member, f"127.0.0.1:{member[1]}", ttl_s=30, fingerprint=fingerprint.hex())
        index.publish_load(member, {"running": load, "waiting": 0})
    pool = PrefillPool(PoolConfig(redis_url, prefill_target="127.0.0.1:50052"), FINGERPRINT)
    try:
        assert pool.pick() == "127.0.0.1:2"  # p3 is least loaded but computes other blocks (fingerprint)
        index.publish_load("p2", {"running": 5})
        pool.refresh()
        assert pool.pick() == "127.0.0.1:1"
        for member in ("p1", "p2", "p3"):
            index.deregister(member, int(index.redis.get(index.key("epoch", member))))
        pool.refresh()
        assert pool.pick() == "127.0.0.1:50052"  # none registered: the configured target
    finally:
        pool.close()
    empty = PrefillPool(PoolConfig(redis_url, index_namespace="t4"), FINGERPRINT)
    with pytest.raises(NoPrefillReplica):
        empty.pick()
    empty.close()
    index.close()


def test_replica_block_size_and_fingerprint_come_from_its_registration():
    member = StoreRef("d", "127.0.0.1:1", 1, "kvlayout-v1:L30:B16:H3:D64:float32", FINGERPRINT.hex())
    replica = Replica(member, stub=None, channel=None, published={"running": "2", "waiting": "1", "block_size": "16"})
    assert replica.block_size == 16 and replica.fingerprint == FINGERPRINT and replica.published_load == 3
    # the block size is a registered field of its own, never read out of the layout's text
    assert Replica(member, stub=None, channel=None, published={}).block_size == 0


def api_request(gateway: Gateway, **body) -> ApiRequest:
    """A checked chat (`messages=`) or completion (`prompt=`) body, with the ids the gateway computes."""
    request = parse_request(json.dumps({"model": gateway.served_model, **body}).encode(), "messages" in body,
                            gateway.limits)
    gateway.tokenize(request)
    return request


def test_gateway_sends_its_token_ids_only_to_replicas_registered_with_its_tokenizer(redis_url):
    gateway = Gateway(GatewayConfig(redis_url=redis_url, index_namespace="t6"))
    index = RedisIndex(redis_url, worker_namespace("t6", "decode"))
    tokenizers = {"same": gateway.tokenizer.fingerprint, "other": "0" * 32, "older": None}
    for port, (member, fingerprint) in enumerate(tokenizers.items(), start=1):
        index.register(member, f"127.0.0.1:{port}", 30.0, fingerprint=FINGERPRINT.hex())
        index.publish_load(member, {"block_size": "16"} | ({"tokenizer_fingerprint": fingerprint} if fingerprint else {}))
    chat = api_request(gateway, messages=[{"role": "user", "content": "Hi there"}])
    completion = api_request(gateway, prompt="Once upon")

    async def built() -> dict[str, tuple]:
        await gateway.refresh()  # the registry as the gateway reads it
        try:
            replicas = {r.replica_id: r for r in gateway.replicas.up()}
            assert set(replicas) == set(tokenizers)
            return {name: (gateway.generate_request(chat, replica, [7, 8], 1),
                           gateway.generate_request(completion, replica, [], 0)) for name, replica in replicas.items()}
        finally:
            await gateway.replicas.close()

    sent = asyncio.run(built())
    chat_ids = gateway.tokenizer.encode_chat([ChatMessage("user", "Hi there")])
    same_chat, same_completion = sent["same"]
    assert same_chat.WhichOneof("input") == "token_ids" and list(same_chat.token_ids.ids) == chat_ids
    assert list(same_completion.token_ids.ids) == gateway.tokenizer.encode_prompt("Once upon")
    assert list(same_chat.resume_token_ids) == [7, 8] and same_chat.sampling.seed == (chat.sampling.seed + 1) % 2 ** 64
    for name in ("other", "older"):  # another tokenizer, or a worker from before the field: the text, as before
        text_chat, text_completion = sent[name]
        assert text_chat.WhichOneof("input") == "messages" and text_chat.messages.messages[0].content == "Hi there"
        assert text_completion.WhichOneof("input") == "prompt" and text_completion.prompt == "Once upon"
        assert list(text_chat.resume_token_ids) == [7, 8]
    counted = {sent_as: gateway.registry.get_sample_value("kvcluster_gateway_prompt_inputs_total", {"input": sent_as})
               for sent_as in ("token_ids", "text")}
    assert counted == {"token_ids": 2, "text": 4}
    index.close()


@pytest.mark.parametrize("chat", [True, False])
def test_gateway_checks_its_token_ids_as_decode_would_naming_the_body_field(chat):
    gateway = Gateway(GatewayConfig(redis_url=""))
    text = "word " * gateway.limits.max_tokens
    request = api_request(gateway, messages=[{"role": "user", "content": text}]) if chat else \
        api_request(gateway, prompt=text)
    member = StoreRef("d", "127.0.0.1:1", 1, "", FINGERPRINT.hex())
    same = Replica(member, stub=None, channel=None, published={"tokenizer_fingerprint": gateway.tokenizer.fingerprint})
    with pytest.raises(ApiError) as refused:
        gateway.generate_request(request, same, [], 0)
    field = "messages" if chat else "prompt"
    limit = gateway.limits.max_tokens - 1
    assert (refused.value.status, refused.value.param) == (400, field)
    assert refused.value.message == (f"{field}: has {len(request.token_ids)} tokens; the limit is {limit} "
                                     f"(context {limit + 1} minus one output token)")
    # a replica with another tokenizer counts the prompt itself (and names the same field)
    other = Replica(member, stub=None, channel=None, published={})
    assert other.tokenizer_fingerprint is None
    assert gateway.generate_request(request, other, [], 0).WhichOneof("input") == field
