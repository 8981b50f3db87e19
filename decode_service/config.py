"""Configuration of the decode service (the public Generate endpoint): flags `--name`, env `KVC_NAME`."""

from typing import Literal

from kvcluster.config import setting
from kvcluster.worker.config import WorkerConfig

DisaggregationMode = Literal["auto", "always", "never"]


class DecodeConfig(WorkerConfig):
    """Every knob of one decode worker (the shared ones are in WorkerConfig)."""

    port: int = setting(50051, "gRPC port of Generate; 0 picks a free one")
    metrics_port: int = setting(9101, "Prometheus /metrics port; 0 picks a free one, -1 disables it")
    kv_capacity_bytes: int = setting(1 << 30, "bytes of this worker's own paged KV pool")
    max_batch: int = setting(16, "sequences decoded together in one step")
    max_workers: int = setting(128, "gRPC handler threads; keep above max_streams so health checks still answer")
    prefill_target: str = setting("127.0.0.1:50052", "host:port of the prefill service, used when no prefill "
                                  "replica is registered in Redis (registered ones are preferred, least loaded "
                                  "first); empty = always prefill locally")
    max_streams: int = setting(120, "concurrent Generate streams before new ones get RESOURCE_EXHAUSTED")
    local_prefill_max_tokens: int = setting(-1, "uncached prompt tokens up to which decode prefills locally "
                                            "instead of calling the prefill service; -1 = decided from measured "
                                            "costs (a Prefill call's overhead vs this worker's prefill speed)")
    disaggregation: DisaggregationMode = setting(
        "auto", "when a prompt's uncached part is longer than the local-prefill threshold: auto = call Prefill only "
        "when it pays, decided per request (not when every prefill replica shares this worker's cores, nor when their "
        "queues are longer than computing here), always = call Prefill, never = prefill locally")
    cache_generated: bool = setting(True, "push a finished request's new full blocks (prompt + output) to the cache")
    max_pending_pushes: int = setting(8, "finished requests whose new blocks may wait to be pushed; beyond it a "
                                      "request's blocks are dropped (counted), so a slow store never piles up memory")
    prefill_timeout_seconds: float = setting(120.0, "deadline of one Prefill call (capped by the client's deadline)")
    verify_fraction: float = setting(0.0, "fraction of warm requests (prompt K/V not all computed here) recomputed "
                                     "without the cache on the side and compared token by token and block by block "
                                     "(kvcluster_verify_mismatch_total); 0 = off, 1 = every one", ge=0, le=1)
    api_key: str = setting("", "when set, Generate and ResetPrefixCache require the metadata "
                           "'authorization: Bearer <key>'")
