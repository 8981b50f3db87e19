"""Getting a prompt's KV into the decode worker: from the prefill service, from the cache, or not at all.

Conditional disaggregation (as Dynamo does): one index lookup first; when the uncached part of
the prompt is short (`local_prefill_max_tokens`) decode pulls the cached blocks itself and
computes the rest locally, skipping the Prefill round trip. Otherwise it calls Prefill and pulls
every block Prefill lists. Any failure leaves fewer blocks (and a fallback reason):
the engine then recomputes whatever is missing, so the answer never changes.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from kvcluster.block_io import BlockBatch, batch_from_payloads
from kvcluster.blocks import prefix_hashes
from kvcluster.cache_client import Fetched, KVCacheClient
from kvcluster.messages import sampling_to_proto
from kvcluster.model.engine import Engine
from kvcluster.model.sampling import SamplingParams
from kvcluster.proto import prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class PromptKV:
    """KV blocks for the prompt's first `num_tokens` tokens, in block order, and how they were obtained."""

    blocks: BlockBatch | None = None    # the pulled blocks, staged for the worker's pool
    num_tokens: int = 0
    first_token: int | None = None     # sampled by the prefill service
    cached_tokens: int = 0             # prompt tokens whose KV came from the cache
    held_blocks: int = 0               # leading full blocks known to be in the cache already
    lookup_s: float = 0.0
    prefill_s: float = 0.0
    pull_s: float = 0.0
    bytes_pulled: int = 0              # cache hits
    bytes_handoff: int = 0             # blocks prefill computed for this request
    fallbacks: list[str] = field(default_factory=list)


class PromptKVSource:
    """Decides where a prompt's KV comes from and fetches it. Thread-safe; runs on handler threads."""

    def __init__(self, engine: Engine, cache: KVCacheClient | None, prefill: prefill_pb2_grpc.PrefillServiceStub | None,
                 local_prefill_max_tokens: int, prefill_timeout_s: float):
        self.engine = engine
        self.cache = cache
        self.prefill = prefill
        self.local_max = local_prefill_max_tokens
        self.prefill_timeout_s = prefill_timeout_s

    def fetch(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
              time_left_s: float | None, cache_salt: str = "") -> PromptKV:
        if self.cache is None:
            return PromptKV()
        deadline = None if time_left_s is None else time.monotonic() + time_left_s
        bs = self.engine.config.block_size
        hashes = prefix_hashes(self.engine.fingerprint, prompt_ids, bs, cache_salt)
        blocks = [list(prompt_ids[i * bs:(i + 1) * bs]) for i in range(len(hashes))]
        usable = min(len(hashes), (len(prompt_ids) - 1) // bs)
        holders, lookup_s, fallback = self.cache.lookup(hashes[:usable])
        kv = PromptKV(lookup_s=lookup_s, fallbacks=[fallback] if fallback else [])
        if self.prefill is not None and len(prompt_ids) - len(holders) * bs > self.local_max:
            if self._via_prefill(kv, request_id, prompt_ids, params, deadline, cache_salt):
                return kv
        fetched = self.cache.pull_held(hashes, blocks, holders, _left(deadline)) if holders else Fetched()
        self._take(kv, fetched, [bs] * len(fetched.payloads), cached_blocks=len(fetched.payloads))
        kv.held_blocks = len(fetched.payloads)
        return kv

    def _via_prefill(self, kv: PromptKV, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                     deadline: float | None, cache_salt: str = "") -> bool:
        start = time.perf_counter()
        timeout = self.prefill_timeout_s if deadline is None else min(_left(deadline), self.prefill_timeout_s)
        try:
            response = self.prefill.Prefill(prefill_pb2.PrefillRequest(
                request_id=request_id, token_ids=prompt_ids, sampling=sampling_to_proto(params), cache_salt=cache_salt),
                timeout=timeout)
        except grpc.RpcError as exc:
            log.warning("prefill call failed (%s): prefilling locally", exc.code() if hasattr(exc, "code") else exc)
            kv.fallbacks.append("prefill_unavailable")
            return False
        finally:
            kv.prefill_s = time.perf_counter() - start
        mismatch = self._mismatch(response, params)
        if mismatch:
            log.warning("not using the prefill service's answer: %s; prefilling locally", mismatch)
            kv.fallbacks.append("prefill_mismatch")
            return False
        kv.first_token = response.first_token_id
        fetched = self.cache.pull(response.blocks, _left(deadline))
        cached_blocks = response.num_cached_tokens // self.engine.config.block_size
        self._take(kv, fetched, [ref.num_tokens for ref in response.blocks], cached_blocks)
        kv.cached_tokens = min(response.num_cached_tokens, kv.num_tokens)
        full = [ref for ref in response.blocks if ref.WhichOneof("key") == "block_hash"]
        kv.held_blocks = next((i for i, ref in enumerate(full) if not ref.store_address), len(full))
        return True

    def _mismatch(self, response: prefill_pb2.PrefillResponse, params: SamplingParams) -> str | None:
        """Why a Prefill answer cannot be trusted here (its K/V and first token came from another
        model, dtype or layout, or were sampled with another seed), or None."""
        ours = self.engine.fingerprint
        if response.fingerprint != ours:
            return f"it was computed under fingerprint {response.fingerprint.hex()}, this worker's is {ours.hex()}"
        if response.seed != params.seed:
            return f"its first token was sampled with seed {response.seed}, the request has {params.seed}"
        return None

    def _take(self, kv: PromptKV, fetched: Fetched, tokens_per_block: list[int], cached_blocks: int) -> None:
        """Stage the pulled blocks here on the handler thread; the engine thread only scatters them."""
        kv.blocks = batch_from_payloads(fetched.payloads, self.engine.layout.block_nbytes, self.engine.pool.device)
        kv.num_tokens = sum(tokens_per_block[:len(fetched.payloads)])
        kv.pull_s = fetched.pull_s
        block_bytes = self.engine.layout.block_nbytes
        kv.bytes_pulled = min(len(fetched.payloads), cached_blocks) * block_bytes
        kv.bytes_handoff = fetched.bytes_pulled - kv.bytes_pulled
        kv.cached_tokens = kv.num_tokens
        if fetched.fallback:
            kv.fallbacks.append(fetched.fallback)


def _left(deadline: float | None) -> float | None:
    """Seconds until the client's deadline (never below a token amount: the call then fails fast)."""
    return None if deadline is None else max(0.001, deadline - time.monotonic())
