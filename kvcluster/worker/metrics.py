"""Metrics every worker that reads the shared cache exports (prefill and decode)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

INDEX_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5)
FALLBACK_REASONS = ("redis_unavailable", "store_unavailable", "short_pull", "checksum_mismatch", "token_mismatch",
                    "prefill_unavailable", "prefill_mismatch", "push_failed")


STEP_KINDS = ("decode", "prefill", "mixed")
BUDGET_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


class SchedulerMetrics:
    """What the engine's scheduler did each step (kvcluster.engine.scheduler): the share of the token
    budget used, prefill vs decode tokens, steps by kind, preemptions, prompt tokens still queued."""

    def __init__(self, registry: CollectorRegistry):
        self.budget_used = Histogram("kvcluster_scheduler_budget_used_ratio", "Tokens a step computed / its token "
                                     "budget", buckets=BUDGET_BUCKETS, registry=registry)
        self.budget = Gauge("kvcluster_scheduler_step_budget_tokens", "Token budget of one engine step",
                            registry=registry)
        self.tokens = Counter("kvcluster_scheduler_tokens", "Tokens computed by engine steps, by kind: decode (one "
                              "per running sequence) or prefill (prompt chunks)", ["kind"], registry=registry)
        self.steps = Counter("kvcluster_scheduler_steps", "Engine steps by kind: decode, prefill, mixed (both in one "
                             "forward)", ["kind"], registry=registry)
        self.preemptions = Counter("kvcluster_scheduler_preemptions", "Running sequences preempted (blocks taken "
                                   "back, recomputed later) because the KV pool ran short", registry=registry)
        self.queued_tokens = Gauge("kvcluster_scheduler_queued_tokens", "Prompt tokens waiting sequences have yet "
                                   "to compute", registry=registry)
        for kind in ("decode", "prefill"):
            self.tokens.labels(kind)
        for kind in STEP_KINDS:
            self.steps.labels(kind)

    def observe(self, engine) -> None:
        """After each step, on the engine thread."""
        plan = engine.last_plan
        self.budget.set(plan.budget)
        self.preemptions.inc(plan.preempted)
        self.queued_tokens.set(sum(max(0, s.num_tokens - s.num_computed) for s in engine.waiting))
        if not plan.items:
            return
        self.steps.labels(plan.kind).inc()
        self.budget_used.observe(plan.num_tokens / max(1, plan.budget))
        self.tokens.labels("decode").inc(plan.decode_tokens)
        self.tokens.labels("prefill").inc(plan.prefill_tokens)


class FallbackMetrics:
    """Fallbacks to recompute, Redis index latency and the scheduler: shared by prefill and decode."""

    def __init__(self, registry: CollectorRegistry):
        self.scheduler = SchedulerMetrics(registry)
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
    (a kvcluster.worker.numerics.NumericsStatus) and whether a cached or batched answer is the cold one."""
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

