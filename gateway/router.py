"""Which decode replica serves a request.

cache_aware (as llm-d's and Dynamo's KV-aware routers, in time units of prefill work): each replica's
cost is the prompt work it would still have to do before this request's first token,
    queued prefill tokens - overlap_weight x (prompt tokens its local prefix cache holds),
the queued tokens being the uncached prompt tokens of this gateway's requests on it that have not had
their first token yet (`Replica.queued_prefill_tokens`; exact and current, where the replicas'
published counts lag a heartbeat behind), the held tokens its leading held blocks x its block size.
(The prompt's own length is the same for every replica and drops out.) The cheapest wins; ties go
to the one with fewer open requests, then the lower published load (other clients' work), then the
next in turn. A replica holding the prefix is so chosen until the work queued ahead of the request
there exceeds the prefill the prefix saves: then the prompt is computed (or pulled from the store)
on a shorter queue instead of herding the conversation's turns onto one replica. overlap_weight 1
weighs a saved token as a queued one (a held token costs nothing, a missing one about a token of
prefill); below 1 spreads more, above 1 herds more.
The overlap comes from the registry (`RedisIndex.held_prefix`) for the prompt's chained block
hashes, computed exactly as the workers compute them (kvcluster.kv.blocks.prefix_hashes with the
fingerprint and block size each replica registered, and the request's cache_salt).
round_robin: each replica in turn, whatever it holds (the baseline of bench/routing.py).
least_loaded: the fewest open requests (the gateway asks the index nothing), ties as above.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.replicas import Replica


@dataclass(frozen=True)
class Route:
    replica: Replica
    reason: str          # cache_hit, least_loaded or round_robin
    overlap_blocks: int  # leading prompt blocks the replica held when chosen
    queued_tokens: int = 0  # prompt tokens it did not hold: what the request adds to its queued prefill


class Router:
    def __init__(self, policy: str, overlap_weight: float = 1.0):
        self.policy = policy
        self.overlap_weight = overlap_weight
        self._turn = itertools.count()

    def pick(self, replicas: Sequence[Replica], overlaps: Sequence[int], prompt_tokens: int = 0) -> Route:
        """`overlaps[i]`: leading prompt blocks replicas[i] holds (all 0 under round_robin and least_loaded);
        `prompt_tokens`: the prompt's length (0 where not tokenized: nothing is queued)."""
        turn = next(self._turn)
        n = len(replicas)
        if self.policy == "round_robin":
            return self._route(replicas[turn % n], "round_robin", overlaps[turn % n], prompt_tokens)

        def ties(i: int) -> tuple:
            return replicas[i].load, replicas[i].published_load, (i - turn) % n

        if self.policy == "least_loaded":
            best = min(range(n), key=ties)
        else:
            best = min(range(n), key=lambda i: (self.cost(replicas[i], overlaps[i]), *ties(i)))
        return self._route(replicas[best], "cache_hit" if overlaps[best] > 0 else "least_loaded", overlaps[best],
                           prompt_tokens)

    @staticmethod
    def _route(replica: Replica, reason: str, overlap: int, prompt_tokens: int) -> Route:
        return Route(replica, reason, overlap, max(prompt_tokens - overlap * replica.block_size, 0))

    def cost(self, replica: Replica, overlap_blocks: int) -> float:
        """Prefill tokens ahead of the request's first token on `replica`, less the prompt length."""
        return replica.queued_prefill_tokens - self.overlap_weight * overlap_blocks * replica.block_size
