"""Prefill metrics. Handlers and the engine thread call the `observe_*` methods; the registry is passed in."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvcluster.engine.engine import Engine
from kvcluster.engine.sequence import TokenSources
from kvcluster.worker.metrics import FallbackMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


PREFILL_SOURCES = ("local_cache", "store", "computed")


class PrefillMetrics(FallbackMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
        self.tokens = Counter("kvcluster_prefill_tokens", "Prompt tokens by where their KV came from: local_cache "
                              "(this worker's pool), store (pulled), computed", ["source"], registry=registry)
        self.seconds = Histogram("kvcluster_prefill_seconds", "Prefill call latency", buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.queue_depth = Gauge("kvcluster_prefill_queue_depth", "Prompts waiting for the engine", registry=registry)
        self.batch_size = Histogram("kvcluster_prefill_batch_size", "Prompts per prefill forward",
                                    buckets=BATCH_BUCKETS, registry=registry)
        for source in PREFILL_SOURCES:
            self.tokens.labels(source)

    def observe_step(self, engine: Engine) -> None:
        self.scheduler.observe(engine)
        plan = engine.last_plan
        if plan.items:
            self.batch_size.observe(len(plan.items))
        self.queue_depth.set(len(engine.waiting))

    def observe_request(self, sources: TokenSources, seconds: float) -> None:
        self.tokens.labels("local_cache").inc(sources.local_cache)
        self.tokens.labels("store").inc(sources.pulled)
        self.tokens.labels("computed").inc(sources.computed)
        self.seconds.observe(seconds)
