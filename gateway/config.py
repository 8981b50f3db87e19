"""Configuration of the gateway (OpenAI-compatible HTTP API): flags `--name`, env `KVC_NAME`."""

from typing import Literal

from kvcluster.config import setting
from kvcluster.rpc.security import SecuritySettings

RoutingPolicy = Literal["cache_aware", "round_robin", "least_loaded"]
RoutingIndex = Literal["redis", "local"]


class GatewayConfig(SecuritySettings):
    """Every knob of the gateway. TLS settings apply to its gRPC calls to the decode replicas."""

    host: str = setting("127.0.0.1", "interface to listen on (0.0.0.0 for all)")
    port: int = setting(8000, "HTTP port of the OpenAI API, /health and /metrics; 0 picks a free one")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis holding the worker registry")
    index_namespace: str = setting("kvc", "prefix of every Redis key this cluster uses")
    decode_targets: str = setting("", "comma-separated host:port of decode replicas to use instead of the "
                                  "registry (no cache-aware routing: they publish nothing)")
    model: str = setting("", "the model the cluster serves (its tokenizer and chat template are loaded to route "
                         "prompts); empty = the shipped SmolLM2")
    served_model_name: str = setting("", "model id of /v1/models and the `model` field; empty = the model file's "
                                     "name without its extension")
    api_keys: str = setting("", "comma-separated API keys; when set every /v1 call and POST "
                            "/reset_prefix_cache needs 'Authorization: Bearer <key>'")
    decode_api_key: str = setting("", "API key the decode replicas require on Generate and ResetPrefixCache, "
                                  "if any")
    routing: RoutingPolicy = setting("cache_aware", "cache_aware: the replica holding the longest prompt prefix, "
                                     "weighed against load; round_robin: each replica in turn; least_loaded: the "
                                     "replica with the fewest open requests, whatever it holds")
    overlap_weight: float = setting(1.0, "cache_aware's cost of a replica = its queued prefill tokens (uncached "
                                    "prompt tokens of this gateway's requests on it before their first token) - "
                                    "overlap_weight x prompt tokens it holds: how many queued prefill tokens one "
                                    "cached prompt token is worth")
    routing_index: RoutingIndex = setting("redis", "where cache_aware reads what each replica holds: redis (one "
                                          "held_prefix round trip per request) or local (a copy kept from the index's "
                                          "KV events each refresh, no round trip; up to refresh_seconds stale)")
    refresh_seconds: float = setting(0.5, "how often the replica list and loads are re-read from Redis", gt=0)
    request_timeout_seconds: float = setting(600.0, "deadline of one Generate call to a replica")
    reset_timeout_seconds: float = setting(10.0, "deadline of one replica's ResetPrefixCache call "
                                           "(POST /reset_prefix_cache); a replica that does not answer in time "
                                           "makes the reset answer 503")
    max_failovers: int = setting(2, "times one request moves to another replica after its replica failed", ge=0)
    suspect_seconds: float = setting(5.0, "a replica that failed a call stays out of rotation this long, unless it "
                                     "registers again")
    grace_seconds: float = setting(5.0, "on SIGTERM, how long in-flight requests may finish")

    def keys(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    def static_targets(self) -> list[str]:
        return [target.strip() for target in self.decode_targets.split(",") if target.strip()]
