"""Gateway metrics (prefix `kvcluster_gateway_`); the registry is passed in."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ROUTING_REASONS = ("cache_hit", "least_loaded", "round_robin")
PROMPT_INPUTS = ("token_ids", "text")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, replicas_up: Callable[[], int],
                 local_index_blocks: Callable[[], dict[str, int]] = dict):
        self.requests = Counter("kvcluster_gateway_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=registry)
        self.ttft = Histogram("kvcluster_gateway_time_to_first_token_seconds", "Time from request arrival to the "
                              "first generated token, as the gateway sees it", buckets=TTFT_BUCKETS, registry=registry)
        self.latency = Histogram("kvcluster_gateway_request_latency_seconds", "End-to-end latency of completions",
                                 buckets=E2E_BUCKETS, registry=registry)
        self.routing = Counter("kvcluster_gateway_routing_decisions", "Replica choices by reason: cache_hit (a "
                               "replica held a prefix of the prompt), least_loaded (none did), round_robin",
                               ["reason"], registry=registry)
        self.routed_blocks = Counter("kvcluster_gateway_routed_cached_blocks", "Leading prompt blocks the chosen "
                                     "replica held when it was chosen", registry=registry)
        self.failovers = Counter("kvcluster_gateway_failovers", "Requests moved to another replica after theirs "
                                 "failed, by when: before_first_token or mid_stream", ["when"], registry=registry)
        self.prompt_inputs = Counter("kvcluster_gateway_prompt_inputs", "Generate calls by how the prompt was "
                                     "sent: token_ids (the gateway's, or the client's) or text (the replica's "
                                     "tokenizer differs from the gateway's or is unknown)", ["input"],
                                     registry=registry)
        self.replicas_up = Gauge("kvcluster_gateway_replicas_up", "Decode replicas in rotation", registry=registry)
        self.replicas_up.set_function(replicas_up)
        registry.register(LocalIndexBlocks(local_index_blocks))
        for reason in ROUTING_REASONS:
            self.routing.labels(reason)
        for when in ("before_first_token", "mid_stream"):
            self.failovers.labels(when)
        for sent_as in PROMPT_INPUTS:
            self.prompt_inputs.labels(sent_as)


class LocalIndexBlocks:
    """kvcluster_gateway_local_index_blocks{replica}: what the gateway's own copy of the index
    (--routing-index local, kept from the KV events) credits to each replica, as routing reads it;
    no samples with the Redis index."""

    def __init__(self, blocks_by_replica: Callable[[], dict[str, int]]):
        self.blocks_by_replica = blocks_by_replica

    def collect(self):
        family = GaugeMetricFamily("kvcluster_gateway_local_index_blocks", "Blocks the gateway's own copy of the "
                                   "index credits to each decode replica (--routing-index local)", labels=["replica"])
        for replica, blocks in sorted(self.blocks_by_replica().items()):
            family.add_metric([replica], blocks)
        yield family
