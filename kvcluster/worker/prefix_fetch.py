"""One prefix fetcher for both workers: a prompt's blocks come from this worker's own pool first,
then from the cache store, and only what neither holds is computed.

Two steps, so that a caller can decide between them (decode chooses between computing the rest
here and handing it to a prefill replica once it knows how much is cached):
1. `lookup`: the prompt's chained block hashes (computed once per request), how many leading
   blocks the engine's local cache holds (a hint: the engine re-checks at admission), and one Redis
   lookup of the blocks after those;
2. `pull`: the blocks the lookup found, pulled from their holders and staged for the engine's
   device on the calling thread, as a `PrefixSource` the engine thread only scatters.
A failure of either step leaves fewer blocks and a fallback reason, never an error: the engine
computes whatever is missing.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvcluster.engine.engine import Engine, PrefixSource
from kvcluster.kv.blocks import BlockHash, prefix_hashes
from kvcluster.kv.index import StoreRef
from kvcluster.rpc.cache_client import Fetched, KVCacheClient


@dataclass
class PrefixLookup:
    """Where a prompt's full blocks are: [0, local_blocks) in the worker's own pool, then the store's
    `holders` of blocks [first_looked_up, first_looked_up + len(holders))."""

    hashes: list[BlockHash]
    token_blocks: list[list[int]]
    local_blocks: int = 0
    first_looked_up: int = 0
    holders: list[StoreRef] = field(default_factory=list)
    lookup_s: float = 0.0
    fallback: str | None = None

    @property
    def cached_blocks(self) -> int:
        """Leading full blocks held by this worker or a store."""
        return max(self.local_blocks, self.first_looked_up + len(self.holders))

    def holder(self, block: int) -> StoreRef | None:
        """The store the lookup found holding `block`, if it looked that block up and found it."""
        i = block - self.first_looked_up
        return self.holders[i] if 0 <= i < len(self.holders) else None


class PrefixFetcher:
    """Lookups and pulls of prompt prefixes for one engine. Thread-safe (handler threads)."""

    def __init__(self, engine: Engine, cache: KVCacheClient | None):
        self.engine = engine
        self.cache = cache

    def lookup(self, prompt_ids: Sequence[int], cache_salt: str = "", use_cache: bool = True,
               look_up_local: bool = False) -> PrefixLookup:
        """Hashes, the local tier's hint and one store lookup (of the blocks after the local ones, or of
        all of them with `look_up_local`: a prefill worker hands store references to decode)."""
        bs = self.engine.config.block_size
        hashes = prefix_hashes(self.engine.fingerprint, prompt_ids, bs, cache_salt)
        found = PrefixLookup(hashes, [list(prompt_ids[i * bs:(i + 1) * bs]) for i in range(len(hashes))])
        if not use_cache:
            return found
        found.local_blocks = self.engine.local_prefix_blocks(hashes)
        if self.cache is not None:
            found.first_looked_up = 0 if look_up_local else found.local_blocks
            found.holders, found.lookup_s, found.fallback = self.cache.lookup(hashes[found.first_looked_up:])
        return found

    def pull(self, found: PrefixLookup, timeout_s: float | None = None) -> tuple[PrefixSource, Fetched]:
        """The store blocks past the local ones, pulled and staged; what the pull did (its time,
        bytes and fallback; the lookup's fallback when the pull had none)."""
        start = found.local_blocks
        skip = start - found.first_looked_up
        holders = found.holders[skip:] if skip >= 0 else []
        fetched = Fetched()
        if holders and self.cache is not None:
            fetched = self.cache.pull_held(found.hashes[start:], found.token_blocks[start:], holders, timeout_s)
        fetched.lookup_s = found.lookup_s
        fetched.fallback = fetched.fallback or found.fallback
        bs = self.engine.config.block_size
        source = PrefixSource(found.hashes, self.engine.stage_blocks(fetched.payloads), start,
                              len(fetched.payloads) * bs)
        return source, fetched


def time_left(deadline: float | None) -> float | None:
    """Seconds until a monotonic `deadline` (never below a token amount: the call then fails fast)."""
    return None if deadline is None else max(0.001, deadline - time.monotonic())
