"""Real pieces for service tests: a private redis-server, cache stores and workers on port 0, and a
whole cluster with the gateway."""

import contextlib
from collections.abc import Iterator

import grpc
from prometheus_client import CollectorRegistry

from cache_store.config import StoreConfig
from cache_store.server import StoreServer, create_server as create_store
from decode_service.config import DecodeConfig
from decode_service.server import create_server as create_decode
from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.cli.redis_server import RedisServer, start_redis_server
from kvcluster.engine.engine import EngineConfig, load_engine
from kvcluster.proto import decode_pb2_grpc
from kvcluster.rpc.plumbing import make_channel

from prefill_service.config import PrefillConfig
from prefill_service.server import create_server as create_prefill

SMOLLM_BLOCK_BYTES = 737_280


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    server = start_redis_server()
    try:
        yield server
    finally:
        server.close()


def start_store(redis_url: str, blocks: int = 256, store_id: str = "", port: int = 0, dtype: str = "float32",
                **overrides) -> StoreServer:
    """A SmolLM2-layout cache store (float32 KV, as the test engines compute, unless told) on a free
    (or given) port, its index published to `redis_url`; room for `blocks` float32 blocks."""
    config = StoreConfig(host="127.0.0.1", port=port, metrics_port=-1, redis_url=redis_url, dtype=dtype,
                         capacity_bytes=blocks * SMOLLM_BLOCK_BYTES, store_id=store_id,
                         heartbeat_seconds=0.5, grace_seconds=0.5, **overrides)
    server, _ = create_store(config)
    return server.start()


def channel_to(port: int) -> grpc.Channel:
    return make_channel(f"127.0.0.1:{port}")


@contextlib.contextmanager
def gateway_cluster(gateway_args: tuple = (), kv_capacity_bytes: int = 192 << 20) -> Iterator[Cluster]:
    """Redis, store, prefill, two decode replicas (small pools, 0.5 s heartbeats) and the gateway,
    every one its own process, logs discarded."""
    with open("/dev/null", "w") as quiet, Cluster(
            ClusterPorts.any_free(), dtype="float32", decode_replicas=2, gateway=True, log_stream=quiet,
            gateway_args=gateway_args, extra_env={"KVC_KV_CAPACITY_BYTES": str(kv_capacity_bytes),
                                                  "KVC_REGISTRY_HEARTBEAT_SECONDS": "0.5"}) as running:
        yield running


@contextlib.contextmanager
def in_process_cluster(engine_config: EngineConfig, store_blocks: int, prefill: dict, decode: dict) -> Iterator[dict]:
    """Redis, a store, and a prefill and a decode worker in this process (each its own float32 SmolLM2
    engine of `engine_config`; `prefill` / `decode`: more of their configs' fields), decode calling
    prefill. Yields the servers, their registries and a stub to decode."""
    with running_redis() as redis_server:
        store = start_store(redis_server.url, blocks=store_blocks)
        registries = {"prefill_registry": CollectorRegistry(), "decode_registry": CollectorRegistry()}
        prefill_server, prefill_port = create_prefill(
            PrefillConfig(port=0, metrics_port=-1, redis_url=redis_server.url, **prefill),
            engine=load_engine(device="cpu", dtype="float32", config=engine_config), registry=registries["prefill_registry"])
        prefill_server.start()
        decode_server, decode_port = create_decode(
            DecodeConfig(port=0, metrics_port=-1, redis_url=redis_server.url, prefill_target=f"127.0.0.1:{prefill_port}",
                         **decode),
            engine=load_engine(device="cpu", dtype="float32", config=engine_config), registry=registries["decode_registry"])
        decode_server.start()
        try:
            yield {"store": store, "prefill": prefill_server, "decode": decode_server, **registries,
                   "stub": decode_pb2_grpc.DecodeServiceStub(channel_to(decode_port))}
        finally:
            decode_server.stop(0.5)
            prefill_server.stop(0.5)
            store.stop(0.5)
