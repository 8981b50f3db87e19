"""Real pieces for the cache store tests: a private redis-server, stores on port 0, test blocks.

Import what a module needs explicitly (`from tests.store_fixtures import ...`); pytest then finds
the fixtures by name in that module. Every Redis here is a private `redis-server` on a free
loopback port; the machine's own Redis is never touched.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

from cache_store.config import StoreConfig
from cache_store.server import StoreServer, create_server
from kvcluster.cli import polling
from kvcluster.cli.redis_server import RedisServer
from kvcluster.kv.blocks import Fingerprint, make_fingerprint, prefix_hashes
from kvcluster.kv.index import RedisIndex
from kvcluster.kv.pool import KVLayout
from kvcluster.proto import cache_pb2, cache_pb2_grpc
from kvcluster.rpc.plumbing import make_channel
from kvcluster.rpc.store_client import Block, StoreClient, key_ref, make_ref

SMALL_LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=1, head_dim=8)     # 512-byte blocks
BIG_LAYOUT = KVLayout(num_layers=16, block_size=16, num_kv_heads=4, head_dim=64)    # 512 KiB blocks
SMOLLM2_LAYOUT = KVLayout(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64)  # 737,280 bytes


def fingerprint_for(layout: KVLayout, model: bytes = b"test-model") -> Fingerprint:
    return make_fingerprint(model, layout.canonical())


def make_blocks(layout: KVLayout, count: int, seed: int = 0, fingerprint: bytes | None = None) -> list[Block]:
    """`count` chained full blocks of random tokens and random bytes (seeded)."""
    fingerprint = fingerprint or fingerprint_for(layout)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 49152, size=count * layout.block_size).tolist()
    blocks = []
    for i, block_hash in enumerate(prefix_hashes(fingerprint, tokens, layout.block_size)):
        payload = rng.bytes(layout.block_nbytes)
        block_tokens = tokens[i * layout.block_size:(i + 1) * layout.block_size]
        blocks.append((make_ref(payload, block_tokens, block_hash=block_hash), payload))
    return blocks


def tail_block(layout: KVLayout, request_key: str, num_tokens: int = 3, seed: int = 0) -> Block:
    rng = np.random.default_rng(seed)
    payload = rng.bytes(layout.block_nbytes)
    return make_ref(payload, list(range(num_tokens)), request_key=request_key), payload


def hashes_of(blocks: list[Block]) -> list[bytes]:
    return [header.block_hash for header, _ in blocks]


def store_config(redis_url: str, layout: KVLayout = SMALL_LAYOUT, blocks: int = 16, **overrides) -> StoreConfig:
    """A CPU store on free ports, `blocks` blocks of `layout`, fast heartbeats."""
    values = dict(host="127.0.0.1", port=0, metrics_port=-1, redis_url=redis_url, device="cpu",
                  capacity_bytes=blocks * layout.block_nbytes, heartbeat_seconds=0.2, grace_seconds=0.0,
                  num_layers=layout.num_layers, block_size=layout.block_size,
                  num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype)
    return StoreConfig(**{**values, **overrides})


def wait_until(condition: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    """Poll `condition` until it is truthy; the result says whether it became so in time."""
    return polling.wait_until(condition, timeout_s, interval_s)


@contextlib.contextmanager
def held_pull(target: str, fingerprint: bytes, keys: Sequence[bytes | str]) -> Iterator:
    """A pull stream left unread after its first message, so the store keeps its pins.

    Without BDP probing the HTTP/2 window stays near 64 KiB, so a pull of a few hundred KiB or
    more (BIG_LAYOUT blocks, 4 KiB chunks) cannot be buffered whole: the store's generator stays
    suspended mid-stream, pins held, until the test reads on or cancels."""
    channel = make_channel(target, options=[("grpc.http2.bdp_probe", 0)])
    request = cache_pb2.PullBlocksRequest(fingerprint=fingerprint, blocks=[key_ref(k) for k in keys],
                                          max_chunk_bytes=4096)
    call = cache_pb2_grpc.CacheStoreStub(channel).PullBlocks(request, timeout=60)
    try:
        next(call)  # the store pins before it sends anything
        yield call
    finally:
        call.cancel()
        channel.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's private Redis, emptied for this test."""
    index = RedisIndex(redis_server.url)
    index.redis.flushall()
    index.close()
    return redis_server.url


@pytest.fixture
def redis_index(redis_url: str) -> Iterator[RedisIndex]:
    index = RedisIndex(redis_url)
    yield index
    index.close()


class StoreFactory:
    """Starts stores and their clients; stops all of them at the end of the test."""

    def __init__(self):
        self.started: list[tuple[StoreServer, StoreClient]] = []

    def __call__(self, config: StoreConfig) -> tuple[StoreServer, StoreClient]:
        store, port = create_server(config)
        store.start()
        client = StoreClient(f"127.0.0.1:{port}", store.pool.layout, timeout_s=30.0)
        self.started.append((store, client))
        return store, client

    def close(self) -> None:
        for store, client in self.started:
            client.close()
            store.stop(grace_s=0)


@pytest.fixture
def store_factory() -> Iterator[StoreFactory]:
    factory = StoreFactory()
    yield factory
    factory.close()
