"""Secure by default: `kvcluster up` guards every internal RPC with a token it makes itself, block
keys are bound to the cluster secret, and a request's cache_salt keeps tenants' caches apart.

The real model is loaded once in this process (`smollm_engine`); the in-process workers share its
weights through engines of their own (own KV pool, own cluster secret)."""

import grpc
import pytest

from decode_service.config import DecodeConfig
from decode_service.server import create_server as create_decode
from kvcluster.cli.launcher import INTERNAL_TOKEN_ENV, Cluster, ClusterPorts
from kvcluster.client import Client
from kvcluster.engine.engine import Engine, EngineConfig
from kvcluster.kv.blocks import (MAX_CACHE_SALT_CHARS, ROOT_HASH, chain_root, fingerprint_key, make_fingerprint,
                              prefix_hashes)
from kvcluster.model.tokenizer import ChatMessage
from kvcluster.proto import cache_pb2, common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from kvcluster.rpc.plumbing import make_channel
from kvcluster.rpc.security import INTERNAL_TOKEN_HEADER, internal_metadata
from kvcluster.rpc.store_client import StoreClient
from prefill_service.config import PrefillConfig
from prefill_service.server import create_server as create_prefill
from tests.cluster_fixtures import running_redis, start_store
from tests.store_fixtures import SMOLLM2_LAYOUT, hashes_of, make_blocks, wait_until

MESSAGES = [("system", "You are the help desk of a container port. Answer in one sentence, name the terminal "
                       "and the gate, and never guess opening hours you were not told."),
            ("user", "Where do I drop off an empty reefer container?")]
MAX_TOKENS = 8
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def prompt_ids(engine: Engine) -> list[int]:
    return engine.tokenizer.encode_chat([ChatMessage(role, content) for role, content in MESSAGES])


def sibling(engine: Engine, cluster_secret: str = "", kv_bytes: int = 64 << 20) -> Engine:
    """An engine over `engine`'s weights (no second load) with its own pool and cluster secret."""
    return Engine(engine.model, engine.tokenizer, engine.model_digest, EngineConfig(kv_capacity_bytes=kv_bytes),
                  cluster_secret)


# ---- `kvcluster up` makes a token and every child uses it ------------------------------------

def test_cluster_makes_a_fresh_token_unless_the_environment_sets_one(monkeypatch):
    monkeypatch.delenv(INTERNAL_TOKEN_ENV, raising=False)
    first, second = Cluster(), Cluster()
    assert len(first.internal_token) >= 43 and first.internal_token != second.internal_token
    assert first.env[INTERNAL_TOKEN_ENV] == first.internal_token  # what every child inherits
    monkeypatch.setenv(INTERNAL_TOKEN_ENV, "chosen-by-the-operator")
    assert Cluster().internal_token == Cluster().env[INTERNAL_TOKEN_ENV] == "chosen-by-the-operator"


@pytest.fixture(scope="module")
def up_cluster(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("up") / "cluster.log"
    with open(log_path, "w") as log_stream, \
            Cluster(ClusterPorts.any_free(), dtype="float32", log_stream=log_stream) as cluster:
        yield cluster


def store_of(cluster: Cluster, metadata=()) -> StoreClient:
    return StoreClient(f"127.0.0.1:{cluster.children['cache_store'].grpc_port}", SMOLLM2_LAYOUT, metadata=metadata)


@pytest.mark.slow  # a multi-process cluster
def test_the_store_of_kvcluster_up_refuses_callers_without_the_token(up_cluster):
    blocks = make_blocks(SMOLLM2_LAYOUT, 1, seed=13)
    fingerprint = make_fingerprint(b"outsider", SMOLLM2_LAYOUT.canonical())
    outsider = store_of(up_cluster)
    try:
        for call in (lambda: outsider.push_blocks(fingerprint, blocks), lambda: outsider.stats(),
                     lambda: outsider.lookup(fingerprint, hashes_of(blocks))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == UNAUTHENTICATED and "internal token" in err.value.details()
    finally:
        outsider.close()
    insider = store_of(up_cluster, up_cluster.internal_metadata)
    try:
        pushed = insider.push_blocks(fingerprint, blocks)
        assert [r.status for r in pushed.results] == [cache_pb2.BlockPushResult.STORED]
        assert insider.lookup(fingerprint, hashes_of(blocks)) == 1 and insider.stats().blocks_used >= 1
    finally:
        insider.close()


@pytest.mark.slow  # a multi-process cluster
@pytest.mark.parametrize("wrong", ["", "x", "token-prefix", "token+1"])
def test_near_miss_tokens_are_refused(up_cluster, wrong):
    token = up_cluster.internal_token
    guess = {"token-prefix": token[:-1], "token+1": token + "x"}.get(wrong, wrong)
    store = store_of(up_cluster, [(INTERNAL_TOKEN_HEADER, guess)])
    try:
        with pytest.raises(grpc.RpcError) as err:
            store.stats()
        assert err.value.code() == UNAUTHENTICATED
    finally:
        store.close()


@pytest.mark.slow  # a multi-process cluster
def test_prefill_of_kvcluster_up_refuses_callers_without_the_token(up_cluster):
    channel = make_channel(f"127.0.0.1:{up_cluster.children['prefill_service'].grpc_port}")
    try:
        with pytest.raises(grpc.RpcError) as err:
            prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(prefill_pb2.PrefillRequest(token_ids=[1, 2, 3]),
                                                                 timeout=30)
        assert err.value.code() == UNAUTHENTICATED
    finally:
        channel.close()


@pytest.mark.slow  # a multi-process cluster
def test_generate_needs_no_token_and_its_blocks_are_keyed_by_the_cluster_secret(up_cluster, smollm_engine):
    with Client(up_cluster.decode_target) as client:
        result = client.generate(messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.0)
    assert len(result.token_ids) >= 1 and result.usage.prompt_tokens > 32
    ids, bs = prompt_ids(smollm_engine), smollm_engine.config.block_size
    keyed = make_fingerprint(smollm_engine.identity, smollm_engine.layout.canonical(),
                             fingerprint_key(up_cluster.internal_token))
    store = store_of(up_cluster, up_cluster.internal_metadata)
    try:
        # The prompt's full blocks were pushed under the keyed chain (by prefill, or by decode after
        # the request when it computed the prompt itself); the unkeyed one finds nothing.
        assert wait_until(lambda: store.lookup(keyed, prefix_hashes(keyed, ids, bs)) == len(ids) // bs)
        unkeyed = smollm_engine.fingerprint
        assert store.lookup(unkeyed, prefix_hashes(unkeyed, ids, bs)) == 0
    finally:
        store.close()


# ---- keyed fingerprints -----------------------------------------------------------------------

def test_the_cluster_secret_keys_the_fingerprint_and_every_block_hash(smollm_engine):
    tokens = list(range(1000, 1064))
    a, a_again, b, open_engine = (sibling(smollm_engine, s, kv_bytes=4 << 20) for s in ("a", "a", "b", ""))
    assert a.fingerprint == a_again.fingerprint
    assert prefix_hashes(a.fingerprint, tokens, 16) == prefix_hashes(a_again.fingerprint, tokens, 16)
    assert a.fingerprint != b.fingerprint
    assert not set(prefix_hashes(a.fingerprint, tokens, 16)) & set(prefix_hashes(b.fingerprint, tokens, 16))
    # No secret: the fingerprint every cluster had before keys existed.
    assert open_engine.fingerprint == smollm_engine.fingerprint == make_fingerprint(
        smollm_engine.identity, smollm_engine.layout.canonical())
    assert open_engine.fingerprint not in (a.fingerprint, b.fingerprint)
    assert fingerprint_key("") == b"" and fingerprint_key("a") != fingerprint_key("b")


def test_a_salt_roots_its_own_chain():
    tokens = list(range(2000, 2048))
    fingerprint = make_fingerprint(b"model", SMOLLM2_LAYOUT.canonical())
    plain, salted = prefix_hashes(fingerprint, tokens, 16), prefix_hashes(fingerprint, tokens, 16, "tenant-a")
    assert chain_root("") == ROOT_HASH != chain_root("tenant-a") != chain_root("tenant-b")
    assert prefix_hashes(fingerprint, tokens, 16, "") == plain
    assert not set(plain) & set(salted) and not set(salted) & set(prefix_hashes(fingerprint, tokens, 16, "tenant-b"))


# ---- cache_salt through decode, prefill and a store (in process, with a token) -------------------

TOKEN = "salted-cluster-token"


@pytest.fixture(scope="module")
def salted_cluster(smollm_engine):
    secured = dict(internal_token=TOKEN, metrics_port=-1, port=0)
    with running_redis() as redis_server:
        store = start_store(redis_server.url, blocks=128, internal_token=TOKEN)
        prefill, prefill_port = create_prefill(PrefillConfig(redis_url=redis_server.url, **secured),
                                               engine=sibling(smollm_engine, TOKEN))
        prefill.start()
        decode, decode_port = create_decode(DecodeConfig(redis_url=redis_server.url, prefill_target=f"127.0.0.1:{prefill_port}",
                                                         prefill_timeout_seconds=60.0, **secured),
                                            engine=sibling(smollm_engine, TOKEN))
        decode.start()
        channel = make_channel(f"127.0.0.1:{decode_port}")
        yield {"store": store, "decode": decode, "stub": decode_pb2_grpc.DecodeServiceStub(channel),
               "prefill_port": prefill_port}
        channel.close()
        decode.stop(0.5)
        prefill.stop(0.5)
        store.stop(0.5)


def generate(cluster, cache_salt: str, max_tokens: int = MAX_TOKENS) -> tuple[list[decode_pb2.GenerateResponse], list[int]]:
    request = decode_pb2.GenerateRequest(
        messages=decode_pb2.ChatMessages(messages=[decode_pb2.ChatMessage(role=r, content=c) for r, c in MESSAGES]),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), cache_salt=cache_salt)
    responses = list(cluster["stub"].Generate(request, timeout=180))
    cluster["decode"].generator.flush_pushes()
    cluster["store"].flush_index()  # the next request's lookup sees what this one pushed
    return responses, [t for r in responses for t in r.token_ids]


@pytest.mark.slow  # a multi-process cluster
def test_a_salt_shares_the_cache_only_with_the_same_salt(salted_cluster, smollm_engine):
    # Unsalted blocks are cached before tenant b asks: b must not find them (nor a's).
    runs = {name: generate(salted_cluster, salt) for name, salt in
            (("a cold", "tenant-a"), ("a warm", "tenant-a"), ("no salt", ""), ("b", "tenant-b"))}
    cached = {name: responses[-1].usage.cached_tokens for name, (responses, _) in runs.items()}
    assert cached["a cold"] == 0 and cached["a warm"] > 0, cached
    assert cached["b"] == 0 and cached["no salt"] == 0, cached
    outputs = [ids for _, ids in runs.values()]
    assert len(outputs[0]) == MAX_TOKENS and all(ids == outputs[0] for ids in outputs)
    # What a Generate client sees carries no fingerprint, keyed or not.
    seen = b"".join(r.SerializeToString() for responses, _ in runs.values() for r in responses)
    fingerprint = salted_cluster["decode"].generator.worker.engine.fingerprint
    assert fingerprint not in seen and fingerprint.hex().encode() not in seen


@pytest.mark.slow  # a multi-process cluster
def test_a_salt_of_the_longest_length_is_served(salted_cluster):
    responses, ids = generate(salted_cluster, "s" * MAX_CACHE_SALT_CHARS, max_tokens=1)
    assert len(ids) == 1 and responses[-1].usage.cached_tokens == 0


@pytest.mark.slow  # a multi-process cluster
def test_a_salt_over_the_limit_is_invalid_argument_naming_it(salted_cluster):
    with pytest.raises(grpc.RpcError) as err:
        generate(salted_cluster, "s" * (MAX_CACHE_SALT_CHARS + 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_salt" in err.value.details() and str(MAX_CACHE_SALT_CHARS) in err.value.details()
    channel = make_channel(f"127.0.0.1:{salted_cluster['prefill_port']}", metadata=internal_metadata(TOKEN))
    try:
        with pytest.raises(grpc.RpcError) as err:
            prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(
                prefill_pb2.PrefillRequest(token_ids=[1, 2, 3], cache_salt="s" * 300), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in err.value.details()
    finally:
        channel.close()
