"""The cache store's Prometheus metrics, read at scrape time from the stats the store keeps.

The pool (PoolStats / PoolCounters), the servicer (ServiceCounters) and the index publisher
count in plain fields where the work happens; this collector turns them into metrics on each
scrape, so the hot paths never touch prometheus_client. The registry is passed in (tests use
their own). Labels are only `direction` ("push" | "pull") and, for the spill tiers (docs/spill.md),
`tier` ("device" | "host" | "disk"; only the tiers the store has) and `from_tier`/`to_tier`.
"""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cache_store.pool import PoolStats, StorePool
from cache_store.replicator import ReplicationCounters
from cache_store.service import ServiceCounters
from cache_store.stream_watchdog import StreamWatchdog
from kvcluster.kv.index_publisher import IndexPublisher

GAUGES = (  # (name, help, PoolStats field)
    ("kvcluster_store_blocks_used", "KV blocks held (including blocks being written)", "blocks_used"),
    ("kvcluster_store_blocks_capacity", "KV blocks the pool can hold", "blocks_capacity"),
    ("kvcluster_store_bytes_used", "Bytes of the pool holding blocks", "bytes_used"),
    ("kvcluster_store_bytes_capacity", "Bytes preallocated for the pool", "bytes_capacity"),
    ("kvcluster_store_pinned_blocks", "Blocks pinned by pulls in flight", "pinned_blocks"),
    ("kvcluster_store_request_blocks", "Request-scoped tail blocks under lease", "request_blocks"),
)
POOL_COUNTERS = (  # (name without _total, help, PoolCounters field)
    ("kvcluster_store_lookups", "Lookup and Pull requests answered", "lookups"),
    ("kvcluster_store_hit_blocks", "Requested blocks that were held (Lookup and Pull)", "hit_blocks"),
    ("kvcluster_store_miss_blocks", "Requested blocks that were not held (Lookup and Pull)", "miss_blocks"),
    ("kvcluster_store_evictions", "Blocks evicted (least recently pulled first)", "evictions"),
    ("kvcluster_store_lease_expiries", "Request-scoped blocks freed because their lease ran out", "lease_expiries"),
)
SERVICE_COUNTERS = (
    ("kvcluster_store_checksum_failures", "Blocks whose bytes did not match their checksum (push or pull)",
     "checksum_failures"),
    ("kvcluster_store_blocks_stored", "Pushed blocks stored", "blocks_stored"),
    ("kvcluster_store_blocks_duplicate", "Pushed blocks already held (acknowledged, not copied)", "blocks_duplicate"),
    ("kvcluster_store_blocks_rejected", "Pushed blocks rejected (checksum, size, header)", "blocks_rejected"),
    ("kvcluster_store_bulk_pulls", "Pulls whose bytes went over the bulk TCP path", "bulk_pulls"),
    ("kvcluster_store_bulk_tickets_unused", "Bulk pull offers whose ticket expired or whose call ended unclaimed "
     "(the client fell back to the gRPC stream)", "bulk_tickets_unused"),
)
REPLICATION_COUNTERS = (
    ("kvcluster_store_replication_sent_blocks", "Hot blocks this store copied to another store", "sent_blocks"),
    ("kvcluster_store_replication_received_blocks", "Hot blocks another store copied here (stored)",
     "received_blocks"),
    ("kvcluster_store_replication_failed_blocks", "Hot blocks not copied (push failed or refused, index "
     "unavailable, queue full, checksum); retried at their next re-check", "failed_blocks"),
)


class StoreCollector(Collector):
    """Reads one store's stats on each scrape."""

    def __init__(self, pool: StorePool, counters: ServiceCounters, publisher: IndexPublisher,
                 watchdog: StreamWatchdog, replication: ReplicationCounters):
        self.pool = pool
        self.replication = replication
        self.counters = counters
        self.publisher = publisher
        self.watchdog = watchdog

    def collect(self) -> Iterator:
        stats = self.pool.stats()
        for name, help_text, attribute in GAUGES:
            yield GaugeMetricFamily(name, help_text, value=getattr(stats, attribute))
        for name, help_text, attribute in POOL_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=getattr(stats.counters, attribute))
        service = self.counters.snapshot()
        for name, help_text, attribute in SERVICE_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=service[attribute])
        yield from self._transfer(service)
        yield from self._tiers(stats)
        replication = self.replication.snapshot()
        for name, help_text, attribute in REPLICATION_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=replication[attribute])
        yield GaugeMetricFamily("kvcluster_store_index_epoch",
                                "Epoch of this store in the Redis index; 0 = not registered",
                                value=self.publisher.epoch)
        yield CounterMetricFamily("kvcluster_store_index_errors", "Redis index operations that failed",
                                  value=self.publisher.errors)
        yield CounterMetricFamily("kvcluster_store_streams_cancelled", "Push and pull streams cancelled for "
                                  "stalling or running too long", value=self.watchdog.cancelled)

    @staticmethod
    def _transfer(service: dict[str, float]) -> Iterator:
        moved = CounterMetricFamily("kvcluster_transfer_bytes", "Block payload bytes moved", labels=["direction"])
        spent = CounterMetricFamily("kvcluster_transfer_seconds", "Time spent in push and pull calls",
                                    labels=["direction"])
        for direction in ("push", "pull"):
            moved.add_metric([direction], service[f"{direction}_bytes"])
            spent.add_metric([direction], service[f"{direction}_seconds"])
        yield moved
        yield spent


    @staticmethod
    def _tiers(stats: PoolStats) -> Iterator:
        held = GaugeMetricFamily("kvcluster_store_tier_blocks_used", "KV blocks held per tier (including blocks "
                                 "being written)", labels=["tier"])
        capacity = GaugeMetricFamily("kvcluster_store_tier_blocks_capacity", "KV blocks each tier can hold",
                                     labels=["tier"])
        capacity_bytes = GaugeMetricFamily("kvcluster_store_tier_bytes_capacity", "Bytes preallocated per tier",
                                           labels=["tier"])
        for tier in stats.tiers:
            held.add_metric([tier.name], tier.blocks_used)
            capacity.add_metric([tier.name], tier.blocks_capacity)
            capacity_bytes.add_metric([tier.name], tier.bytes_capacity)
        yield from (held, capacity, capacity_bytes)
        counters, names = stats.counters, [tier.name for tier in stats.tiers]
        spills = CounterMetricFamily("kvcluster_store_tier_spills", "Blocks moved down a tier (evicted from the "
                                     "upper one, kept in the lower one)", labels=["from_tier", "to_tier"])
        for upper, lower in zip(names, names[1:]):
            spills.add_metric([upper, lower], counters.spills.get((upper, lower), 0))
        yield spills
        for name, help_text, counter, tiers in (
                ("kvcluster_store_tier_promotions", "Blocks copied back into the device pool for a pull, by the "
                 "tier they came from", counters.promotions, names[1:]),
                ("kvcluster_store_tier_drops", "Full blocks that left the store (evicted from the last tier, "
                 "corrupt or unreadable), by the tier they left", counters.drops, names),
                ("kvcluster_store_tier_checksum_failures", "Blocks read back from a lower tier whose bytes did not "
                 "match their checksum (dropped, not served)", counters.tier_checksum_failures, names[1:])):
            family = CounterMetricFamily(name, help_text, labels=["tier"])
            for tier in tiers:
                family.add_metric([tier], counter.get(tier, 0))
            yield family


def register_metrics(registry: CollectorRegistry, pool: StorePool, counters: ServiceCounters,
                     publisher: IndexPublisher, watchdog: StreamWatchdog, replication: ReplicationCounters) -> None:
    registry.register(StoreCollector(pool, counters, publisher, watchdog, replication))

