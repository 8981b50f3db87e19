"""Requests the cluster benchmarks send, and how one is timed from the client's side.

Prompts are random token ids drawn from a seeded generator: a fresh seed (a salt) gives a prompt
no cache has seen, so a "cold" request really is cold; reusing a prefix gives a known hit.
"""

import random
import time
from dataclasses import dataclass

from kvcluster.client import Client
from kvcluster.proto import decode_pb2

TOKEN_RANGE = (100, 40_000)  # ordinary vocabulary ids, clear of SmolLM2's special tokens


def random_tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(*TOKEN_RANGE) for _ in range(count)]


@dataclass
class Timed:
    """One Generate call as the client saw it."""

    ttft_s: float
    total_s: float
    usage: decode_pb2.Usage

    @property
    def cached_tokens(self) -> int:
        return self.usage.cached_tokens


def timed_generate(client: Client, token_ids: list[int], max_tokens: int, bypass_cache: bool = False) -> Timed:
    """Greedy, EOS ignored (a fixed output length); TTFT = until the first streamed token arrives."""
    start = time.perf_counter()
    first = None
    usage = decode_pb2.Usage()
    for response in client.stream(token_ids=token_ids, max_tokens=max_tokens, temperature=0.0,
                                  ignore_eos=True, bypass_cache=bypass_cache):
        if first is None and response.token_ids:
            first = time.perf_counter()
        if response.finish_reason:
            usage = response.usage
    end = time.perf_counter()
    return Timed((first or end) - start, end - start, usage)
