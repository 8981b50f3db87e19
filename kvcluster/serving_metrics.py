"""Metrics every worker that reads the shared cache exports (prefill and decode)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

INDEX_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5)
FALLBACK_REASONS = ("redis_unavailable", "store_unavailable", "short_pull", "checksum_mismatch", "token_mismatch",
                    "prefill_unavailable", "prefill_mismatch", "push_failed")


class FallbackMetrics:
    """Fallbacks to recompute and Redis index latency: shared by prefill and decode."""

    def __init__(self, registry: CollectorRegistry):
        self.fallbacks = Counter("kvcluster_fallbacks", "Cache path failures that fell back to recompute",
                                 ["reason"], registry=registry)
        self.index_lookup = Histogram("kvcluster_index_lookup_seconds", "Redis index lookup latency",
                                      buckets=INDEX_BUCKETS, registry=registry)
        for reason in FALLBACK_REASONS:  # every reason is exported from the start, at 0
            self.fallbacks.labels(reason)

    def observe(self, fallbacks: list[str], lookup_s: float) -> None:
        """Count a request's fallback reasons and its index lookup latency (0 = no lookup made)."""
        for reason in fallbacks:
            self.fallbacks.labels(reason).inc()
        if lookup_s:
            self.index_lookup.observe(lookup_s)

def register_pool_gauges(registry: CollectorRegistry, pool) -> None:
    """The worker's own paged KV pool: blocks in use now, blocks its local cache holds, evictions, size."""
    used = Gauge("kvcluster_worker_kv_blocks_used", "Blocks of this worker's KV pool held by sequences", registry=registry)
    used.set_function(lambda: pool.num_used)
    cached = Gauge("kvcluster_worker_kv_blocks_cached", "Blocks of this worker's KV pool findable by hash (its local "
                   "prefix cache, in use or not)", registry=registry)
    cached.set_function(lambda: pool.num_cached)
    capacity = Gauge("kvcluster_worker_kv_blocks_capacity", "Blocks in this worker's KV pool", registry=registry)
    capacity.set(pool.num_blocks)
    registry.register(_PoolEvictions(pool))


def register_numerics_info(registry: CollectorRegistry, numerics) -> None:
    """`kvcluster_numerics_info{mode, guaranteed} 1`: the arithmetic this worker computes K/V with
    (a kvcluster.numerics.NumericsStatus) and whether a cached or batched answer is the cold one."""
    info = Gauge("kvcluster_numerics_info", "Numerics of this worker: mode batch-invariant or fast, guaranteed true "
                 "when a cached or batched answer is bitwise the cold one", ["mode", "guaranteed"], registry=registry)
    info.labels(numerics.mode, "true" if numerics.guaranteed else "false").set(1)


class _PoolEvictions:
    """`kvcluster_worker_kv_evictions_total`: cached blocks the pool evicted to make room."""

    def __init__(self, pool):
        self.pool = pool

    def describe(self):
        return [CounterMetricFamily("kvcluster_worker_kv_evictions", "Cached blocks this worker's pool evicted for room")]

    def collect(self):
        yield CounterMetricFamily("kvcluster_worker_kv_evictions", "Cached blocks this worker's pool evicted for room",
                                  value=self.pool.evictions)


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Start the /metrics HTTP endpoint (port 0: a free one). Returns (http server, bound port)."""
    host = "::" if host == "[::]" else host
    http_server, _ = start_http_server(port, addr=host, registry=registry)
    return http_server, http_server.server_port
