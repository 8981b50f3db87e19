"""Real pieces for service tests: a private redis-server, cache stores and workers on port 0, and a
whole cluster with the gateway."""

import contextlib
from collections.abc import Iterator

import grpc

from cache_store.config import StoreConfig
from cache_store.server import StoreServer, create_server as create_store
from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.cli.redis_server import RedisServer, start_redis_server
from kvcluster.rpc.plumbing import make_channel

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
