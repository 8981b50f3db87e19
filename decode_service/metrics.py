"""Decode (serving) metrics; the registry is passed in."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvcluster.engine.engine import Engine
from kvcluster.worker.metrics import FallbackMetrics

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# (where, reason) of decode_service.prompt_kv.LocalPrefillPolicy.decide, exported from the start at 0
PREFILL_DECISIONS = (("local", "short"), ("local", "never"), ("local", "no_replica"), ("local", "colocated"), ("local", "prefill_busy"),
                     ("remote", "threshold"), ("remote", "remote"))
OUTCOMES = ("ok", "cancelled", "invalid", "rejected", "error")


class DecodeMetrics(FallbackMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
        self.ttft = Histogram("kvcluster_time_to_first_token_seconds", "Time to first token",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("kvcluster_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=ITL_BUCKETS, registry=registry)
        self.latency = Histogram("kvcluster_request_latency_seconds", "End-to-end Generate latency",
                                 buckets=E2E_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("kvcluster_prompt_tokens", "Prompt tokens by where their KV came from: "
                                     "local_cache (this worker's pool), store (pulled), prefill (computed by the "
                                     "prefill service), local_computed (computed here)", ["source"], registry=registry)
        self.generation_tokens = Counter("kvcluster_generation_tokens", "Generated tokens", registry=registry)
        self.requests = Counter("kvcluster_requests", "Generate requests by outcome", ["outcome"], registry=registry)
        self.pushes_dropped = Counter("kvcluster_generated_pushes_dropped", "Finished requests whose new blocks were "
                                      "not pushed because max_pending_pushes were already waiting", registry=registry)
        self.running = Gauge("kvcluster_requests_running", "Sequences in the decode batch", registry=registry)
        self.waiting = Gauge("kvcluster_requests_waiting", "Sequences waiting for the engine", registry=registry)
        self.local_prefill_max = Gauge("kvcluster_local_prefill_max_tokens", "Uncached prompt tokens up to which "
                                       "decode computes a prompt itself instead of calling Prefill (measured or set)",
                                       registry=registry)
        self.verify = Counter("kvcluster_verify", "Warm requests the live verifier recomputed without the cache, by "
                              "result: match, mismatch, skipped (the verifier or the worker was busy)", ["result"],
                              registry=registry)
        self.verify_mismatch = Counter("kvcluster_verify_mismatch", "Verified warm requests whose recompute differed "
                                       "(tokens or prompt K/V bytes): always a bug", registry=registry)
        self.batch_size = Histogram("kvcluster_batch_size", "Sequences per decode step", buckets=BATCH_BUCKETS,
                                    registry=registry)
        self.prefill_decisions = Counter("kvcluster_prefill_decisions", "Where a prompt's uncached tokens were "
                                         "computed (where=local|remote) and why (reason: short, threshold, no_replica, "
                                         "never, colocated, prefill_busy, remote)", ["where", "reason"], registry=registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for result in ("match", "mismatch", "skipped"):
            self.verify.labels(result)
        for source in ("local_cache", "store", "prefill", "local_computed"):
            self.prompt_tokens.labels(source)
        for where, reason in PREFILL_DECISIONS:
            self.prefill_decisions.labels(where, reason)

    def observe_step(self, engine: Engine) -> None:
        self.scheduler.observe(engine)
        plan = engine.last_plan
        if plan.decode_tokens:
            self.batch_size.observe(plan.decode_tokens)
        self.running.set(len(engine.running))
        self.waiting.set(len(engine.waiting))
