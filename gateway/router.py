"""Which decode replica serves a request.

cache_aware (as Dynamo's KV router): each replica's score is
    overlap_weight x (leading prompt blocks its local prefix cache holds) - load,
load being the requests this gateway has open on it (exact and current; the replicas' published
running + waiting counts lag a heartbeat behind). The best score wins; ties go to the less loaded,
then to the one with the lower published load (other clients' work), then to the next in turn. When no replica holds any of the prompt, it is plain least-loaded.
The overlap comes from the registry (`RedisIndex.held_prefix`) for the prompt's chained block
hashes, computed exactly as the workers compute them (kvcluster.blocks.prefix_hashes with the
fingerprint and block size each replica registered, and the request's cache_salt).
round_robin: each replica in turn, whatever it holds (the baseline of bench/routing.py).
least_loaded: cache_aware's score with every overlap 0 (the gateway asks the index nothing): the
fewest open requests, ties as above.
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


class Router:
    def __init__(self, policy: str, overlap_weight: float):
        self.policy = policy
        self.overlap_weight = overlap_weight
        self._turn = itertools.count()

    def pick(self, replicas: Sequence[Replica], overlaps: Sequence[int]) -> Route:
        """`overlaps[i]`: leading prompt blocks replicas[i] holds (all 0 under round_robin and least_loaded)."""
        turn = next(self._turn)
        if self.policy == "round_robin":
            return Route(replicas[turn % len(replicas)], "round_robin", overlaps[turn % len(replicas)])
        n = len(replicas)
        best = max(range(n), key=lambda i: (self.overlap_weight * overlaps[i] - replicas[i].load, -replicas[i].load,
                                            -replicas[i].published_load, -((i - turn) % n)))
        return Route(replicas[best], "cache_hit" if overlaps[best] > 0 else "least_loaded", overlaps[best])
