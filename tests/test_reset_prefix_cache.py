"""ResetPrefixCache on a decode worker (tiny seeded model, real Redis, real gRPC) and the gateway's
POST /reset_prefix_cache when a replica cannot answer. The whole path through a real cluster (two
replicas, the router's index, usage after the reset) is in tests/test_gateway.py."""

import socket

import grpc
import pytest
from starlette.testclient import TestClient

from decode_service.config import DecodeConfig
from decode_service.server import create_server as create_decode
from gateway.config import GatewayConfig
from gateway.server import Gateway
from kvcluster.client import Client
from kvcluster.kv.blocks import prefix_hashes
from kvcluster.kv.index import RedisIndex, worker_namespace
from kvcluster.model.files import read_tokenizer_data
from kvcluster.model.tokenizer import Tokenizer
from kvcluster.proto import decode_pb2
from kvcluster.rpc.security import API_KEY_HEADER
from tests.cluster_fixtures import running_redis
from tests.conftest import make_tiny_engine
from tests.store_fixtures import wait_until

API_KEY = "reset-test-key"
NAMESPACE = "reset"
PROMPT = list(range(1000, 1000 + 80))  # 5 full blocks of 16


@pytest.fixture(scope="module")
def decode_worker():
    """A decode worker over the tiny model that registers in Redis and publishes its local cache."""
    with running_redis() as redis:
        engine = make_tiny_engine(Tokenizer(read_tokenizer_data()))
        config = DecodeConfig(port=0, metrics_port=-1, redis_url=redis.url, index_namespace=NAMESPACE,
                              prefill_target="", store_wait_seconds=0.0, cache_generated=False, api_key=API_KEY,
                              registry_heartbeat_seconds=0.2)
        server, port = create_decode(config, engine=engine)
        server.start()
        index = RedisIndex(redis.url, worker_namespace(NAMESPACE, "decode"))
        try:
            yield server, f"127.0.0.1:{port}", index
        finally:
            index.close()
            server.stop(0.5)


def held_blocks(index: RedisIndex, hashes) -> int:
    """Leading `hashes` the registry says the (only) decode worker holds."""
    assert wait_until(index.live_stores), "the decode worker never registered"
    return index.held_prefix(hashes, index.live_stores())[0]


def test_reset_drops_the_local_cache_and_its_registry_entries_before_answering(decode_worker):
    server, target, index = decode_worker
    engine = server.worker.engine
    hashes = prefix_hashes(engine.fingerprint, PROMPT, engine.block_size)
    with Client(target, api_key=API_KEY) as client:
        cold = client.generate(token_ids=PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True)
        warm = client.generate(token_ids=PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True)
        assert warm.usage.local_cache_tokens == len(PROMPT) - 1 and warm.token_ids == cold.token_ids  # the last is computed
        assert server.registration.flush() and held_blocks(index, hashes) == 5

        reply = client.stub.ResetPrefixCache(decode_pb2.ResetPrefixCacheRequest(), timeout=10, metadata=client.metadata)
        assert reply.blocks_dropped >= 5 and reply.index_updated
        assert held_blocks(index, hashes) == 0  # already gone when the answer came: no waiting for a heartbeat
        assert engine.local_prefix_blocks(hashes) == 0

        again = client.generate(token_ids=PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True)
    assert again.usage.local_cache_tokens == 0 and again.usage.cached_tokens == 0
    assert again.usage.local_computed_tokens == len(PROMPT) and again.token_ids == cold.token_ids


def test_reset_needs_the_api_key_like_generate(decode_worker):
    _, target, _ = decode_worker
    for api_key in (None, "wrong"):
        with Client(target, api_key=api_key) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.stub.ResetPrefixCache(decode_pb2.ResetPrefixCacheRequest(), timeout=10, metadata=client.metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in err.value.details()


def test_gateway_reset_answers_503_naming_replicas_that_do_not_answer():
    """One replica refuses connections, the other accepts TCP and never speaks: the reset still answers,
    at its deadline, and names both."""
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        config = GatewayConfig(port=0, api_keys=API_KEY, reset_timeout_seconds=1.0, redis_url="",
                               decode_targets=f"127.0.0.1:{refused_port},127.0.0.1:{silent.getsockname()[1]}")
        with TestClient(Gateway(config).app()) as http:
            assert http.post("/reset_prefix_cache").status_code == 401
            response = http.post("/reset_prefix_cache", headers={API_KEY_HEADER: f"Bearer {API_KEY}"})
    finally:
        silent.close()
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "replica_failed" and "2 of 2 replicas" in error["message"]
    assert "static-0 (UNAVAILABLE" in error["message"]
    assert "static-1 (DEADLINE_EXCEEDED" in error["message"]  # ended by reset_timeout_seconds, not left hanging
