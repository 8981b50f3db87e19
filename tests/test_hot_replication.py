"""Hot-block replication (cache_store.replicator): a block pulled `replicate_after_pulls` times gets a
second live holder on the next store in its rendezvous order; below that it does not; tail blocks
never; a failed copy is counted and never touches a pull; and with two store processes, one killed
with SIGKILL under a shared-prefix load, the hot prefix is still served from the store tier, every
answer token-identical to the engine without any cache. Real redis-server, real gRPC servers."""

import io
import signal
import threading

import pytest

from cache_store.config import StoreConfig
from decode_service.config import DecodeConfig
from decode_service.server import create_server as create_decode
from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.client import Client
from kvcluster.engine.sampling import SamplingParams
from kvcluster.errors import InvalidArgument
from kvcluster.kv.blocks import prefix_hashes
from kvcluster.kv.index import RedisIndex, StoreRef, rendezvous_order
from kvcluster.model.files import read_tokenizer_data
from kvcluster.model.tokenizer import Tokenizer
from kvcluster.rpc.cache_client import KVCacheClient
from tests.cluster_fixtures import running_redis
from tests.conftest import TINY_CONFIG, make_tiny_engine
from tests.store_fixtures import (SMALL_LAYOUT, fingerprint_for, hashes_of, make_blocks, redis_index,  # noqa: F401
                                  redis_server, redis_url, store_config, store_factory, tail_block, wait_until)

FINGERPRINT = fingerprint_for(SMALL_LAYOUT)
THRESHOLD = 3


def start_stores(store_factory, redis_url: str, count: int, **overrides) -> list:
    """`count` stores named store-0.. (threshold THRESHOLD unless overridden), all live in the index."""
    overrides = {"replicate_after_pulls": THRESHOLD, **overrides}
    started = [store_factory(store_config(redis_url, store_id=f"store-{i}", **overrides)) for i in range(count)]
    index = RedisIndex(redis_url)
    assert wait_until(lambda: len(index.live_stores()) >= count)
    index.close()
    return started


def pull_times(client, hashes: list[bytes], times: int) -> None:
    for _ in range(times):
        result = client.pull_blocks(FINGERPRINT, hashes)
        assert result.num_blocks_sent == len(hashes), result.stop_reason


def settled(store) -> bool:
    return store.servicer.replicator.idle() and store.flush_index()


def replication(store) -> dict[str, int]:
    return store.servicer.replicator.counters.snapshot()


def test_a_block_pulled_threshold_times_gets_a_second_holder_on_the_rendezvous_next_store(
        store_factory, redis_url, redis_index):
    stores = start_stores(store_factory, redis_url, 3)
    (first, client), others = stores[0], stores[1:]
    blocks = make_blocks(SMALL_LAYOUT, 6, seed=1)
    hashes = hashes_of(blocks)
    assert client.push_blocks(FINGERPRINT, blocks).num_stored == 6
    assert first.flush_index()
    pull_times(client, hashes, THRESHOLD)

    live = redis_index.live_stores()
    expected = []
    for h in hashes:  # the first store after store-0 in each block's own rendezvous order
        order = [store.store_id for store in rendezvous_order(h, live)]
        mine = order.index("store-0")
        expected.append({"store-0", (order[mine + 1:] + order[:mine])[0]})
    assert wait_until(lambda: settled(first) and all(s.flush_index() for s, _ in others)
                      and redis_index.live_holders(hashes) == expected)
    assert replication(first)["sent_blocks"] == 6 and replication(first)["failed_blocks"] == 0
    assert sum(replication(store)["received_blocks"] for store, _ in others) == 6
    assert first.registry.get_sample_value("kvcluster_store_replication_sent_blocks_total") == 6
    # Each copy is the very block: pulled from its new holder, byte for byte.
    for (header, payload), holders in zip(blocks, expected):
        (other,) = holders - {"store-0"}
        copy = next(c for s, c in others if s.store_id == other).pull_blocks(FINGERPRINT, [header.block_hash])
        assert copy.blocks[0][1] == payload and list(copy.blocks[0][0].token_ids) == list(header.token_ids)


def test_below_the_threshold_or_switched_off_a_block_keeps_one_holder(store_factory, redis_url, redis_index):
    (first, client), (second, second_client) = start_stores(store_factory, redis_url, 2)
    (off, off_client), = [store_factory(store_config(redis_url, store_id="store-off", replicate_after_pulls=0))]
    cool, hot_elsewhere = make_blocks(SMALL_LAYOUT, 3, seed=2), make_blocks(SMALL_LAYOUT, 3, seed=3)
    client.push_blocks(FINGERPRINT, cool)
    off_client.push_blocks(FINGERPRINT, hot_elsewhere)
    pull_times(client, hashes_of(cool), THRESHOLD - 1)
    pull_times(off_client, hashes_of(hot_elsewhere), THRESHOLD + 2)
    assert wait_until(lambda: settled(first) and settled(off) and settled(second))
    assert redis_index.live_holders(hashes_of(cool)) == [{"store-0"}] * 3
    assert redis_index.live_holders(hashes_of(hot_elsewhere)) == [{"store-off"}] * 3
    assert replication(first) == replication(off) == replication(second) == {
        "sent_blocks": 0, "received_blocks": 0, "failed_blocks": 0}
    with pytest.raises(InvalidArgument, match="replicate_after_pulls"):
        StoreConfig(replicate_after_pulls=-1)


def test_request_scoped_tail_blocks_are_never_replicated(store_factory, redis_url):
    (first, client), (second, _) = start_stores(store_factory, redis_url, 2)
    for _ in range(THRESHOLD + 1):  # each complete pull frees the tail block: push it again
        client.push_blocks(FINGERPRINT, [tail_block(SMALL_LAYOUT, "req-1")], lease_seconds=30)
        assert client.pull_blocks(FINGERPRINT, ["req-1"]).num_blocks_sent == 1
    assert wait_until(lambda: settled(first))
    assert replication(first)["sent_blocks"] == replication(second)["received_blocks"] == 0
    assert second.pool.stats().request_blocks == 0 and second.pool.stats().blocks_used == 0


def test_a_failed_replication_is_counted_and_never_affects_a_pull(store_factory, redis_url, redis_index):
    """The only other live store is a registration whose address answers nothing."""
    (first, client), = start_stores(store_factory, redis_url, 1)
    redis_index.register("ghost", "127.0.0.1:1", ttl_s=60, layout=SMALL_LAYOUT.canonical())
    blocks = make_blocks(SMALL_LAYOUT, 4, seed=4)
    client.push_blocks(FINGERPRINT, blocks)
    pull_times(client, hashes_of(blocks), THRESHOLD + 3)  # every pull complete, before and after the attempt
    assert wait_until(lambda: replication(first)["failed_blocks"] == 4 and settled(first))
    pull_times(client, hashes_of(blocks), 1)
    assert replication(first)["sent_blocks"] == 0
    assert redis_index.live_holders(hashes_of(blocks)) == [{"store-0"}] * 4
    assert first.registry.get_sample_value("kvcluster_store_replication_failed_blocks_total") == 4


def test_a_pull_falls_back_to_the_other_holder_and_else_to_recompute(store_factory, redis_url, redis_index):
    """The holder a lookup named fails (stopped as a crash would: its index entries stay until its
    heartbeat expires) or runs short mid-pull: the rest comes from another live holder; blocks no
    other store holds are left to recompute."""
    (first, first_client), (second, second_client) = start_stores(store_factory, redis_url, 2, replicate_after_pulls=0)
    blocks, lonely = make_blocks(SMALL_LAYOUT, 4, seed=5), make_blocks(SMALL_LAYOUT, 2, seed=6)
    first_client.push_blocks(FINGERPRINT, blocks)
    second_client.push_blocks(FINGERPRINT, blocks[:2] + lonely)
    assert first.flush_index() and second.flush_index()
    cache = KVCacheClient(redis_index, SMALL_LAYOUT, FINGERPRINT, timeout_s=5.0)
    tokens = [list(header.token_ids) for header, _ in blocks + lonely]
    on_second = [StoreRef(second.store_id, second.address)] * 4

    short = cache.pull_held(hashes_of(blocks), tokens[:4], on_second)  # store-1 delivers 2, then runs short
    assert [payload for _, payload in blocks] == short.payloads and short.fallback is None
    assert [holder.store_id for holder in short.holders] == ["store-1"] * 2 + ["store-0"] * 2

    second.stop(grace_s=0, deregister=False)
    rerouted = cache.pull_held(hashes_of(blocks), tokens[:4], on_second)
    assert rerouted.payloads == short.payloads and rerouted.fallback is None
    assert [holder.store_id for holder in rerouted.holders] == ["store-0"] * 4
    recompute = cache.pull_held(hashes_of(lonely), tokens[4:], on_second[:2])
    assert recompute.payloads == [] and recompute.fallback == "store_unavailable"
    cache.close()


# ---- two store processes, one killed under a shared-prefix load ------------------------------

PREFIX = list(range(2000, 2000 + 96))  # the hot prefix: 6 full blocks of 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
LOAD_REQUESTS = 12  # sent by two clients around the kill


def prompt(i: int) -> list[int]:
    return PREFIX + [3000 + 10 * i + k for k in range(7)]  # its own partial tail block


@pytest.fixture(scope="module")
def tiny_cluster():
    """Two `python -m cache_store` processes (tiny layout, fast heartbeats) and an in-process decode
    worker over the tiny model with its own prefix cache off, so every warm prompt is pulled."""
    layout = TINY_CONFIG.kv_layout(16, "float32")
    store_args = ["--host", "127.0.0.1", "--port", 0, "--metrics-port", -1, "--dtype", "float32",
                  "--num-layers", layout.num_layers, "--num-kv-heads", layout.num_kv_heads,
                  "--head-dim", layout.head_dim, "--capacity-bytes", 256 * layout.block_nbytes,
                  "--heartbeat-seconds", 0.25, "--replicate-after-pulls", THRESHOLD]
    with running_redis() as redis:
        stores = Cluster(ClusterPorts.any_free(), log_stream=io.StringIO(), start_timeout_s=120)
        stores.redis_url = redis.url
        try:
            for name in ("cache_store", "cache_store-1"):
                stores.spawn(name, [*store_args, "--redis-url", redis.url, "--store-id", name])
            engine = make_tiny_engine(Tokenizer(read_tokenizer_data()))
            config = DecodeConfig(port=0, metrics_port=-1, redis_url=redis.url, prefill_target="",
                                  disaggregation="never", prefix_caching=False, store_timeout_seconds=5.0,
                                  internal_token=stores.internal_token)
            decode, port = create_decode(config, engine=engine)
            decode.start()
            try:
                yield {"stores": stores, "engine": engine, "redis_url": redis.url, "target": f"127.0.0.1:{port}"}
            finally:
                decode.stop(0.5)
        finally:
            stores.stop()


def cold_reference(prompts: list[list[int]]) -> list[list[int]]:
    """The same tiny model (same seed) without any cache."""
    engine = make_tiny_engine(Tokenizer(read_tokenizer_data()))
    return [[e.token_id for e in engine.generate(p, GREEDY, use_cache=False)] for p in prompts]


def test_killing_one_of_two_stores_keeps_the_hot_prefix_served_from_the_store_tier(tiny_cluster):
    """The prefix made hot (each store's blocks pulled THRESHOLD times, so each copies its own to the
    other), then one store SIGKILLed while two clients keep sending prompts that share it."""
    cluster, index = tiny_cluster, RedisIndex(tiny_cluster["redis_url"])
    hashes = prefix_hashes(cluster["engine"].fingerprint, PREFIX, 16)
    prompts = [prompt(i) for i in range(6 + LOAD_REQUESTS)]
    expected = cold_reference(prompts)
    answers: dict[int, tuple[list[int], float]] = {}

    def ask(client: Client, i: int) -> tuple[list[int], float]:
        answer = client.generate(token_ids=prompts[i], max_tokens=GREEDY.max_tokens, temperature=0.0, ignore_eos=True)
        answers[i] = answer.token_ids, answer.usage.store_tokens / len(PREFIX)
        return answers[i]

    with Client(cluster["target"]) as client:
        assert ask(client, 0) == (expected[0], 0.0)  # cold: computed, then pushed, spread over both stores
        assert wait_until(lambda: len(index.lookup(hashes)) == len(hashes))
        assert len({holders.pop() for holders in index.live_holders(hashes)}) == 2
        for i in range(1, 1 + THRESHOLD):
            assert ask(client, i) == (expected[i], 1.0)
        assert wait_until(lambda: all(len(held) == 2 for held in index.live_holders(hashes)))
        before = ask(client, 4)[1]

        under_way = threading.Event()

        def load(first: int) -> None:
            with Client(cluster["target"]) as own:
                for i in range(first, len(prompts), 2):
                    ask(own, i)
                    under_way.set()

        clients = [threading.Thread(target=load, args=(first,)) for first in (6, 7)]
        for thread in clients:
            thread.start()
        assert under_way.wait(60)
        cluster["stores"].kill("cache_store-1", signal.SIGKILL)
        for thread in clients:
            thread.join(120)
        # Inside the dead store's heartbeat window the index may still name it: the pull falls back
        # to the other holder. Once the index has dropped it, the survivor serves the whole prefix.
        assert wait_until(lambda: [s.store_id for s in index.live_stores()] == ["cache_store"])
        ask(client, 5)
    index.close()
    assert {i: ids for i, (ids, _) in answers.items()} == dict(enumerate(expected))
    hit_ratios = {i: ratio for i, (_, ratio) in answers.items()}
    assert before == 1.0 and hit_ratios.pop(0) == 0.0  # only the cold request computed the prefix
    assert min(hit_ratios.values()) >= before, hit_ratios
