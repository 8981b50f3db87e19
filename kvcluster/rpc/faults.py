"""Fault injection for the cache path, off by default.

Set with `--faults` / `KVC_FAULTS` on a prefill or decode worker, a comma-separated spec:

    pull_drop=P        a pull stream breaks after its first block (probability P per pull)
    pull_delay_ms=MS   every pull waits MS milliseconds before starting
    corrupt=P          one byte of each pulled block is flipped in transit (probability P per block)
    push_fail=P        a push to a store fails (probability P per push)
    redis_down=1       every index read on the cache path (lookups, holders, the live-store list for
                       pushes) fails as if Redis were unreachable
    seed=N             seed of the dice (default: random)

Each fault takes the worker down a recompute path; the output must not change. The faults act in
wrappers under the cache client (FaultyCacheClient: its index and store clients), which a worker
builds only when `--faults` is set: the normal path holds no fault check.
"""

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields

from kvcluster.errors import InvalidArgument, Unavailable
from kvcluster.kv.index import RedisIndex, StoreRef
from kvcluster.proto import cache_pb2
from kvcluster.rpc.cache_client import KVCacheClient
from kvcluster.rpc.store_client import Block, StoreClient, iter_pull


@dataclass(frozen=True)
class Faults:
    pull_drop: float = 0.0
    pull_delay_ms: float = 0.0
    corrupt: float = 0.0
    push_fail: float = 0.0
    redis_down: bool = False
    seed: int | None = None
    _rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.seed is not None:
            self._rng.seed(self.seed)
        for name in ("pull_drop", "corrupt", "push_fail"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidArgument(f"faults.{name}", f"a probability in [0, 1], got {getattr(self, name)}")

    @classmethod
    def parse(cls, spec: str) -> "Faults":
        kinds = {f.name: f.type for f in fields(cls) if not f.name.startswith("_")}
        values = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, text = item.partition("=")
            if name not in kinds:
                raise InvalidArgument("faults", f"unknown fault {name!r}; known: {', '.join(sorted(kinds))}")
            try:
                values[name] = (text.strip() not in ("0", "false", "")) if name == "redis_down" else (
                    int(text) if name == "seed" else float(text))
            except ValueError:
                raise InvalidArgument(f"faults.{name}", f"not a number: {text!r}") from None
        return cls(**values)

    @property
    def active(self) -> bool:
        return bool(self.pull_drop or self.pull_delay_ms or self.corrupt or self.push_fail or self.redis_down)

    def roll(self, probability: float) -> bool:
        if probability <= 0.0:
            return False
        with self._lock:
            return self._rng.random() < probability


NO_FAULTS = Faults()


class FaultyIndex:
    """A RedisIndex whose reads of block holders fail as if Redis were unreachable while `redis_down`."""

    def __init__(self, index: RedisIndex, faults: Callable[[], Faults]):
        self.index = index
        self.faults = faults

    def lookup(self, hashes: Sequence[bytes]) -> list[StoreRef]:
        self._check()
        return self.index.lookup(hashes)

    def live_holders(self, hashes: Sequence[bytes]) -> list[set[str]]:
        self._check()
        return self.index.live_holders(hashes)

    def __getattr__(self, name: str):
        return getattr(self.index, name)

    def _check(self) -> None:
        _check_redis(self.faults())


class FaultyStoreClient:
    """A StoreClient whose pulls are delayed, dropped or corrupted and whose pushes fail as the faults say.
    With faults active a pull goes over the gRPC stream, where they act on its chunks."""

    def __init__(self, store: StoreClient, faults: Callable[[], Faults]):
        self.store = store
        self.faults = faults

    def iter_blocks(self, fingerprint: bytes, keys: Sequence[bytes | str], summary: cache_pb2.PullSummary,
                    timeout_s: float | None = None) -> Iterator[Block]:
        faults = self.faults()
        if faults.pull_delay_ms:
            time.sleep(faults.pull_delay_ms / 1000.0)
        if not faults.active:
            yield from self.store.iter_blocks(fingerprint, keys, summary, timeout_s=timeout_s)
            return
        stream = self.store.pull_stream(fingerprint, keys, timeout_s=timeout_s)
        try:
            yield from iter_pull(_injected(stream, faults), self.store.layout.block_nbytes, summary)
        finally:
            stream.cancel()

    def push_blocks(self, fingerprint: bytes, blocks, lease_seconds: int = 0) -> cache_pb2.PushBlocksResponse:
        faults = self.faults()
        if faults.roll(faults.push_fail):
            raise Unavailable("push failed (injected fault)")
        return self.store.push_blocks(fingerprint, blocks, lease_seconds)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


class FaultyCacheClient(KVCacheClient):
    """A KVCacheClient over a FaultyIndex and FaultyStoreClients, all reading `self.faults` (tests swap it)."""

    def __init__(self, *args, faults: Faults, **kwargs):
        super().__init__(*args, **kwargs)
        self.faults = faults
        if self.index is not None:
            self.index = FaultyIndex(self.index, self._current)

    def store(self, address: str) -> FaultyStoreClient:
        return FaultyStoreClient(super().store(address), self._current)

    def live_stores(self) -> list[StoreRef]:
        _check_redis(self.faults)  # before the cached list: pushes find no store while Redis is "down"
        return super().live_stores()

    def _current(self) -> Faults:
        return self.faults


def _check_redis(faults: Faults) -> None:
    if faults.redis_down:
        raise Unavailable("Redis unreachable (injected fault)")


def _injected(responses, faults: Faults) -> Iterator[cache_pb2.PullBlocksResponse]:
    """The pull stream as it arrives, with the faults applied to its chunks."""
    drop = faults.roll(faults.pull_drop)
    for response in responses:
        if response.WhichOneof("item") == "chunk":
            if faults.roll(faults.corrupt) and response.chunk.data:
                data = bytearray(response.chunk.data)
                data[len(data) // 2] ^= 0xFF
                response.chunk.data = bytes(data)
            if drop and response.chunk.last:
                raise Unavailable("pull stream dropped (injected fault)")
        yield response
