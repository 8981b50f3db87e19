"""Configuration of the cache store: flags `--name`, env `KVC_NAME`, defaults for one machine.

Which blocks a store accepts: exactly one KV layout (the layout flags, SmolLM2-135M's by
default: 30 layers, 16-token blocks, 3 KV heads, head_dim 64, and `--dtype`, the same setting and
`KVC_DTYPE` variable the workers read), because its pool is one tensor of that block shape; a push
with another layout is rejected as a whole. The store publishes its layout in the index, and a
worker refuses to start when no live store holds its own (a cluster of two models or dtypes runs
one set of stores per layout; workers use only the stores of theirs). Fingerprints: by
default any, since the fingerprint is hashed into every block hash, so blocks of two models can
share a pool but never a key, and a pull must name the fingerprint each block was stored under.
`--fingerprint HEX` restricts the store to one model: pushes under any other are rejected.

Lower tiers (docs/spill.md): `--host-tier-bytes` and `--disk-tier-bytes` (0 = off, the default)
give blocks evicted from the pool a host-memory tier and then a disk file before they are dropped.
"""

import socket
from typing import Any

import torch

from kvcluster.config import setting
from kvcluster.errors import InvalidArgument
from kvcluster.kv.device import default_device, device_of
from kvcluster.kv.dtypes import check_dtype, resolve_dtype
from kvcluster.kv.pool import LAYOUT_VERSION, KVLayout
from kvcluster.rpc.security import SecuritySettings

GIB = 1 << 30
FINGERPRINT_BYTES = 16  # an xxh3-128 digest (kvcluster.kv.blocks.make_fingerprint)
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


class StoreConfig(SecuritySettings):
    """Every knob of one cache store process."""

    host: str = setting("127.0.0.1", "interface to listen on for gRPC and /metrics ([::] or 0.0.0.0 for all)")
    port: int = setting(50053, "gRPC port; 0 picks a free one")
    metrics_port: int = setting(9103, "port of the Prometheus /metrics endpoint; 0 picks a free one, -1 disables it")
    device: str = setting("auto", "where the pool lives: auto (cuda if available), cpu, cuda or cuda:N")
    capacity_bytes: int = setting(0, "pool size in bytes; 0 = 1 GiB on CPU, cuda_memory_fraction of free memory on CUDA")
    cuda_memory_fraction: float = setting(0.5, "share of free GPU memory the pool takes when capacity_bytes is 0",
                                          gt=0, le=1)
    host_tier_bytes: int = setting(0, "host-memory tier for blocks evicted from the pool, in bytes (page-locked "
                                   "when the pool is on CUDA); 0 = none", ge=0)
    disk_tier_bytes: int = setting(0, "disk tier for blocks evicted from the host tier (or from the pool without "
                                   "one), in bytes, preallocated in one file; 0 = none", ge=0)
    disk_tier_path: str = setting("", "file of the disk tier (created, overwritten, removed on shutdown); "
                                  "empty = a new file in the system temp directory")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis index URL (redis:// or rediss://, "
                             "password allowed: redis://:PASS@host:port/0; behind Sentinels: "
                             "redis+sentinel://HOST:PORT,HOST:PORT/SERVICE; Redis Cluster: redis+cluster://HOST:PORT,HOST:PORT); "
                             "empty = publish no index")
    index_namespace: str = setting("kvc", "prefix of every Redis key this cluster uses")
    store_id: str = setting("", "unique name of this store in the index; empty = <hostname>-<port>")
    advertise_address: str = setting("", "host:port clients dial to reach this store; empty = host:port "
                                     "(the hostname when host is a wildcard)")
    heartbeat_seconds: float = setting(2.0, "how often the store refreshes its heartbeat key in Redis", gt=0)
    heartbeat_ttl_seconds: float = setting(0.0, "heartbeat key TTL: readers ignore the store's entries "
                                           "once it expires; 0 = 3 x heartbeat_seconds")
    dead_store_grace_seconds: float = setting(600.0, "a store whose heartbeat has been gone this long is removed "
                                              "from the index (its entries and registration) by a live store")
    lease_seconds: float = setting(30.0, "default lease of request-scoped (tail) blocks, freed on pull or expiry", gt=0)
    max_lease_seconds: float = setting(600.0, "longest lease a push may ask for")
    num_layers: int = setting(30, "KV layout accepted: transformer layers per block", ge=1)
    block_size: int = setting(16, "KV layout accepted: tokens per block", ge=1)
    num_kv_heads: int = setting(3, "KV layout accepted: KV heads", ge=1)
    head_dim: int = setting(64, "KV layout accepted: head dimension", ge=1)
    dtype: str = setting("auto", "KV layout accepted: element type, one of auto, float32, bfloat16, float16; "
                         "auto resolves as a worker's on this store's device (kvcluster.kv.dtypes)")
    layout_version: int = setting(LAYOUT_VERSION, "KV layout accepted: byte layout version")
    fingerprint: str = setting("", "hex model fingerprint to accept exclusively; empty = any")
    max_workers: int = setting(16, "gRPC handler threads (concurrent calls)", ge=1)
    stream_idle_seconds: float = setting(30.0, "a push or pull stream that moves no block for this long is cancelled "
                                         "(its handler thread and pins freed)", gt=0)
    stream_max_seconds: float = setting(300.0, "the longest a push or pull stream may run before it is cancelled", gt=0)
    bulk_port: int = setting(0, "port of the bulk pull listener (a pull's raw bytes over plain TCP, headers and checksums "
                             "over gRPC; docs/pull_path.md); 0 picks a free one, -1 disables the bulk path. "
                             "Always off when the store serves TLS")
    bulk_ticket_seconds: float = setting(5.0, "how long a bulk pull's ticket may wait for its connection before the "
                                         "pull ends and its pins are released", gt=0)
    grace_seconds: float = setting(5.0, "on SIGTERM, how long in-flight calls may finish before being cancelled")
    replicate_after_pulls: int = setting(3, "pulls of a full block after which this store copies it to the next "
                                         "live store in the block's rendezvous order, so a hot prefix survives "
                                         "losing one store (docs/hot_replication.md); 0 = off", ge=0)

    def model_post_init(self, context: Any) -> None:
        check_dtype(self.dtype)
        if len(self.fingerprint_bytes) not in (0, FINGERPRINT_BYTES):
            raise InvalidArgument("fingerprint", f"must be {FINGERPRINT_BYTES} bytes ({2 * FINGERPRINT_BYTES} hex digits)")

    def layout(self, device: torch.device) -> KVLayout:
        """The layout this store holds on `device` (where `auto` is resolved)."""
        return KVLayout(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim,
                        resolve_dtype(self.dtype, device)[0], self.layout_version)

    @property
    def fingerprint_bytes(self) -> bytes:
        try:
            return bytes.fromhex(self.fingerprint)
        except ValueError:
            raise InvalidArgument("fingerprint", f"must be hex, got {self.fingerprint!r}") from None

    @property
    def ttl_seconds(self) -> float:
        return self.heartbeat_ttl_seconds or 3 * self.heartbeat_seconds

    def torch_device(self) -> torch.device:
        return default_device() if self.device == "auto" else torch.device(self.device)

    def pool_capacity_bytes(self, device: torch.device) -> int:
        if self.capacity_bytes:
            return self.capacity_bytes
        free = device_of(device).free_bytes()
        return GIB if free is None else int(free * self.cuda_memory_fraction)

    def identity(self, bound_port: int) -> tuple[str, str]:
        """(store_id, advertise_address) once the gRPC port is known."""
        hostname = socket.gethostname()
        host = hostname if self.host in WILDCARD_HOSTS else self.host
        store_id = self.store_id or f"{hostname}-{bound_port}"
        return store_id, self.advertise_address or f"{host}:{bound_port}"
