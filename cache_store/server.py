"""Assembles a cache store: pool, servicer, gRPC server, index publisher and /metrics.

`create_server(config)` builds everything and binds the gRPC port (0 = a free one); `start()`
starts serving, heartbeating and exposing metrics; `stop()` reports NOT_SERVING, lets in-flight
calls finish for the grace period, releases every pin, and deregisters from the index. Index
trouble never stops the store: without Redis it serves pushes and pulls all the same.
"""

import logging

from prometheus_client import CollectorRegistry

from cache_store.bulk import BulkListener
from cache_store.config import StoreConfig
from cache_store.metrics import register_metrics
from cache_store.pool import StorePool
from cache_store.replicator import HotReplicator
from cache_store.service import CacheStoreServicer, ServiceCounters, StoreIdentity, add_to_server
from cache_store.spill import make_tiers
from cache_store.stream_watchdog import StreamWatchdog
from kvcluster.kv.dtypes import resolve_dtype
from kvcluster.kv.index import RedisIndex
from kvcluster.kv.index_publisher import IndexPublisher
from kvcluster.proto import cache_pb2
from kvcluster.rpc import plumbing as rpc
from kvcluster.rpc.security import token_guards
from kvcluster.rpc.service_server import ServiceServer

log = logging.getLogger(__name__)


class StoreServer(ServiceServer):
    """A built cache store. Tests and `python -m cache_store` drive it the same way."""

    def __init__(self, config: StoreConfig, rpc_server: rpc.RpcServer, servicer: CacheStoreServicer,
                 publisher: IndexPublisher, registry: CollectorRegistry, port: int):
        super().__init__(f"cache store {servicer.identity.store_id}", config, rpc_server, registry, port)
        self.servicer = servicer
        self.publisher = publisher
        self._deregister = True

    @property
    def pool(self) -> StorePool:
        return self.servicer.pool

    @property
    def store_id(self) -> str:
        return self.servicer.identity.store_id

    @property
    def address(self) -> str:
        return self.servicer.identity.address

    def flush_index(self, timeout_s: float = 5.0) -> bool:
        """Wait until the index reflects the pool as of now. True if it does (Redis reachable)."""
        return self.publisher.flush(timeout_s)

    def stop(self, grace_s: float | None = None, deregister: bool = True) -> None:
        """Graceful stop. `deregister=False` leaves the index entries behind, as a crash would."""
        self._deregister = deregister
        super().stop(grace_s)

    def describe_address(self) -> str:
        return self.address

    def describe_parts(self) -> str:
        tiers = ", ".join(f"{tier.name} tier {tier.blocks_capacity} blocks" for tier in self.pool.stats().tiers[1:])
        return f"pool {self.pool.num_blocks} blocks on {self.pool.device}{f'; {tiers}' if tiers else ''}, "

    def _announce(self) -> None:
        self.publisher.start()

    def _close_parts(self) -> None:
        self.servicer.watchdog.close()
        self.servicer.replicator.close()
        if self.servicer.bulk is not None:
            self.servicer.bulk.close()
        self.pool.release_all()
        self.publisher.stop(deregister=self._deregister)
        self.pool.close()


def bulk_listener(config: StoreConfig) -> BulkListener | None:
    """The bulk data path's listener, unless it is disabled (bulk_port -1) or the store serves TLS:
    the bulk socket is plain TCP, so a TLS store streams every pull over gRPC."""
    if config.bulk_port < 0:
        return None
    if config.server_credentials() is not None:
        log.info("bulk pull path off: this store serves TLS, pulls stream over gRPC")
        return None
    return BulkListener(config.host, config.bulk_port, config.bulk_ticket_seconds)


def create_server(config: StoreConfig, registry: CollectorRegistry | None = None) -> tuple[StoreServer, int]:
    """Build a cache store from `config`; returns it (not started) and its bound gRPC port."""
    device = config.torch_device()
    layout = config.layout(device)
    log.info("cache store holds KV layout %s (dtype %s)", layout.canonical(), resolve_dtype(config.dtype, device)[1])
    tiers = make_tiers(layout, config.host_tier_bytes, config.disk_tier_bytes, config.disk_tier_path,
                       pinned=device.type == "cuda")
    try:
        pool = StorePool.from_budget(layout, config.pool_capacity_bytes(device), device, tiers=tiers)
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    identity, counters = StoreIdentity(), ServiceCounters()
    watchdog = StreamWatchdog(config.stream_idle_seconds, config.stream_max_seconds)
    index = RedisIndex(config.redis_url, config.index_namespace) if config.redis_url else None
    replicator = HotReplicator(pool, index, lambda: identity.store_id, config.replicate_after_pulls, config)
    servicer = CacheStoreServicer(pool, config, identity, counters, watchdog, replicator, bulk_listener(config))
    service = rpc.Service(servicer, add_to_server, rpc.service_name(cache_pb2, "CacheStore"))
    rpc_server, port = rpc.create_server([service], config.port, config.host, config.max_workers,
                                         credentials=config.server_credentials(),
                                         guards=token_guards(config.internal_token))
    identity.store_id, identity.address = config.identity(port)
    publisher = IndexPublisher(index, identity.store_id, identity.address, config.heartbeat_seconds,
                               config.ttl_seconds, pool.held_hashes, on_tick=pool.expire_leases,
                               layout=layout.canonical(), fingerprint=config.fingerprint_bytes.hex(),
                               dead_store_grace_s=config.dead_store_grace_seconds)
    identity.epoch = lambda: publisher.epoch
    pool.set_index(publisher)
    registry = registry if registry is not None else CollectorRegistry()
    register_metrics(registry, pool, counters, publisher, watchdog, replicator.counters)
    return StoreServer(config, rpc_server, servicer, publisher, registry, port), port
