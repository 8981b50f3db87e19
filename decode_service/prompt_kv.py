"""Getting a prompt's KV into the decode worker: its own pool first, then the cache store or the
prefill service, else computing it here.

Two tiers (see kvcluster.engine.engine): the blocks this worker's pool already holds are never
fetched again; only the rest is looked up in the store. Conditional disaggregation (as Dynamo
does), decided per request from measured state (`LocalPrefillPolicy.decide`): decode pulls what
the store has and computes the rest itself (in chunks, inside its decode steps) when that part is
short, when every prefill replica computes on this worker's own cores (one machine: a hand-off
adds a call, a push and a pull but no compute), or when the replicas' queues make waiting there
slower than computing here. Otherwise it calls Prefill and pulls every block it lacks. Any
failure leaves fewer blocks (and a fallback reason): the engine then recomputes whatever is
missing, so the answer never changes.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from decode_service.prefill_pool import ReplicaState
from kvcluster.engine.engine import Engine, PrefixSource, ewma
from kvcluster.engine.sampling import SamplingParams
from kvcluster.kv.block_io import BlockBatch
from kvcluster.kv.blocks import BlockHash
from kvcluster.proto import prefill_pb2, prefill_pb2_grpc
from kvcluster.rpc.cache_client import Fetched, KVCacheClient
from kvcluster.rpc.messages import sampling_to_proto
from kvcluster.worker.prefix_fetch import PrefixFetcher, time_left
from kvcluster.worker.registration import host_id

log = logging.getLogger(__name__)


@dataclass
class PromptKV:
    """What decode brings to the engine for one prompt, and how it was obtained."""

    hashes: list[BlockHash] = field(default_factory=list)  # the prompt's block hashes (computed once)
    blocks: BlockBatch | None = None    # the pulled blocks, staged for the worker's pool
    pulled_from: int = 0               # prompt block index of the first pulled block
    num_tokens: int = 0                # tokens the pulled blocks cover
    first_token: int | None = None     # sampled by the prefill service
    local_blocks: int = 0              # leading blocks this worker's pool held when the request arrived
    cached_upto: int = 0               # prompt tokens [0, cached_upto) were cached before this request (the
                                       # rest of what it pulls the prefill service computed for it)
    held_blocks: int = 0               # leading full blocks known to be in the cache store already
    lookup_s: float = 0.0
    prefill_s: float = 0.0
    pull_s: float = 0.0
    bytes_pulled: int = 0              # cache hits
    bytes_handoff: int = 0             # blocks prefill computed for this request
    fallbacks: list[str] = field(default_factory=list)
    use_cache: bool = True             # False for bypass_cache: the local cache is neither read nor written
    cache_salt: str = ""               # roots the hash chain (the engine extends it over generated tokens)
    decision: tuple[bool, str] | None = None  # (remote prefill?, why): LocalPrefillPolicy.decide
    finish_handoff: Callable[[], None] | None = None  # a hand-off whose first token came ahead of its blocks

    def prefix(self) -> PrefixSource:
        return PrefixSource(self.hashes, self.blocks, self.pulled_from, self.num_tokens)


class LocalPrefillPolicy:
    """How many uncached prompt tokens decode computes itself rather than calling Prefill.

    A fixed number when configured (>= 0). Else (-1, the default) measured: a Prefill call costs a
    fixed overhead (queueing, RPCs, pushes, the pull: its wall time minus its compute time) on top
    of the compute it moves away; computing n tokens here costs one forward, its fixed part plus n
    times its per-token part (`Engine.prefill_cost`). Decode computes locally while that costs no
    more than the overhead a Prefill call adds: up to the tokens one local forward computes within
    that overhead (at least one block, at most `ceiling`). Running averages, updated by every call
    and every prefill step. Until this engine has run a long forward, the prefill service's
    measured speed stands in for its per-token part; `prior` until a Prefill call was measured."""

    def __init__(self, fixed: int, engine: Engine, prior: int = 64, ceiling: int = 1024, mode: str = "auto"):
        self.fixed = fixed
        self.mode = mode  # DecodeConfig.disaggregation
        self.engine = engine
        self.prior = prior
        self.ceiling = ceiling
        self.overhead_s: float | None = None
        self.remote_per_token_s: float | None = None
        self._lock = threading.Lock()

    def observe_prefill_call(self, wall_s: float, compute_s: float, computed_tokens: int) -> None:
        with self._lock:
            self.overhead_s = ewma(self.overhead_s, max(0.0, wall_s - compute_s))
            if computed_tokens >= 64:
                self.remote_per_token_s = ewma(self.remote_per_token_s, compute_s / computed_tokens)

    def decide(self, uncached: int, replicas: list[ReplicaState], local_queued: int) -> tuple[bool, str]:
        """Whether to hand this prompt's `uncached` tokens to a prefill replica, and why (Dynamo's
        conditional disaggregation, decided per request from measured state):
        - "short": no more than `max_tokens()`: computing here costs less than a call adds;
        - "threshold": `--disaggregation always`, or a fixed `--local-prefill-max-tokens`, sends every
          longer prompt away; "never": `--disaggregation never` keeps it;
        - "no_replica": nobody to call;
        - "colocated": every replica computes on this worker's own cores (same host id): a hand-off
          adds the call, the push and the pull but no compute;
        - "prefill_busy": waiting in the shortest replica queue alone would take longer than
          computing the prompt here after this worker's own queue;
        - "remote": the hand-off wins."""
        if uncached <= self.max_tokens():
            return False, "short"
        if self.mode == "never":
            return False, "never"
        if self.fixed >= 0 or self.mode == "always":
            return True, "threshold"
        if not replicas:
            return False, "no_replica"
        own = host_id()
        elsewhere = [r for r in replicas if r.host_id != own]  # an unknown host ("") may add compute
        if not elsewhere:
            return False, "colocated"
        local_pt = self.engine.prefill_cost.per_token_s
        remote_pt = self.remote_per_token_s or local_pt
        if local_pt and remote_pt:  # waiting in the replicas' queue alone would outlast computing it here
            if min(r.queued_tokens for r in elsewhere) * remote_pt >= (local_queued + uncached) * local_pt:
                return False, "prefill_busy"
        return True, "remote"

    def max_tokens(self) -> int:
        if self.fixed >= 0:
            return self.fixed
        cost = self.engine.prefill_cost
        per_token = cost.per_token_s or self.remote_per_token_s
        if self.overhead_s is None or not per_token:
            return self.prior
        within = int((self.overhead_s - (cost.fixed_s or 0.0)) / per_token)
        return min(self.ceiling, max(self.engine.config.block_size, within))


class PromptKVSource:
    """Decides where a prompt's KV comes from and fetches it. Thread-safe; runs on handler threads."""

    def __init__(self, engine: Engine, cache: KVCacheClient | None, prefill: prefill_pb2_grpc.PrefillServiceStub | None,
                 local_prefill_max_tokens: int, prefill_timeout_s: float, disaggregation: str = "auto"):
        self.engine = engine
        self.cache = cache
        self.fetcher = PrefixFetcher(engine, cache)
        self.prefill = prefill
        self.policy = LocalPrefillPolicy(local_prefill_max_tokens, engine, mode=disaggregation)
        self.prefill_timeout_s = prefill_timeout_s

    def fetch(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
              time_left_s: float | None, cache_salt: str = "") -> PromptKV:
        found = self.fetcher.lookup(prompt_ids, cache_salt)
        kv = PromptKV(hashes=found.hashes, local_blocks=found.local_blocks, pulled_from=found.local_blocks,
                      lookup_s=found.lookup_s, fallbacks=[found.fallback] if found.fallback else [])
        if self.cache is None:
            return kv
        deadline = None if time_left_s is None else time.monotonic() + time_left_s
        if self.prefill is not None:
            uncached = len(prompt_ids) - found.cached_blocks * self.engine.config.block_size
            kv.decision = self.policy.decide(uncached, self._replicas(), self._local_queued())
            if kv.decision[0] and self._via_prefill(kv, request_id, prompt_ids, params, deadline, cache_salt):
                return kv
        found.fallback = None  # counted above
        source, fetched = self.fetcher.pull(found, time_left(deadline))
        pulled = source.pulled.num_blocks
        self._take(kv, fetched, source.pulled, source.pulled_tokens, cached_blocks=pulled)
        kv.held_blocks = found.local_blocks + pulled
        kv.cached_upto = kv.held_blocks * self.engine.config.block_size
        return kv

    def _replicas(self) -> list[ReplicaState]:
        candidates = getattr(self.prefill, "candidates", None)  # a PrefillPool; a bare stub knows nothing
        return candidates() if candidates is not None else [ReplicaState("", "", 0)]

    def _local_queued(self) -> int:
        """Prompt tokens this worker's engine has yet to compute (a hint read off its thread)."""
        return sum(max(0, s.num_tokens - s.num_computed) for s in list(self.engine.waiting))

    def _via_prefill(self, kv: PromptKV, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                     deadline: float | None, cache_salt: str = "") -> bool:
        """Hand the prompt to a prefill replica (PrefillStream). True once its first token has arrived
        (`kv.first_token`); the block references follow once the replica's pushes are done, and
        `kv.finish_handoff()` waits for them and pulls: the caller sends the first token before."""
        start = time.perf_counter()
        timeout = self.prefill_timeout_s if deadline is None else min(time_left(deadline), self.prefill_timeout_s)
        try:
            stream = self.prefill.PrefillStream(prefill_pb2.PrefillRequest(
                request_id=request_id, token_ids=prompt_ids, sampling=sampling_to_proto(params), cache_salt=cache_salt),
                timeout=timeout)
            first = next(stream)
        except (grpc.RpcError, StopIteration) as exc:
            log.warning("prefill call failed (%s): prefilling locally", exc.code() if hasattr(exc, "code") else exc)
            kv.fallbacks.append("prefill_unavailable")
            return False
        finally:
            kv.prefill_s = time.perf_counter() - start
        mismatch = self._mismatch(first, params)
        if mismatch:
            stream.cancel()
            log.warning("not using the prefill service's answer: %s; prefilling locally", mismatch)
            kv.fallbacks.append("prefill_mismatch")
            return False
        kv.first_token = first.first_token_id
        kv.finish_handoff = lambda: self._pull_handoff(kv, stream, start, deadline)
        return True

    def _pull_handoff(self, kv: PromptKV, stream, start: float, deadline: float | None) -> None:
        """The rest of a hand-off: the replica's block references, then a pull of the blocks this
        worker lacks. A broken stream leaves them missing: the engine computes them (the first token
        stands, being the one this engine samples too)."""
        kv.finish_handoff = None
        try:
            response = next(stream)
        except (grpc.RpcError, StopIteration) as exc:
            log.warning("prefill stream ended before its blocks (%s): computing them here",
                        exc.code() if hasattr(exc, "code") else "no second message")
            kv.fallbacks.append("prefill_unavailable")
            return
        finally:
            kv.prefill_s = time.perf_counter() - start
        local, bs = kv.local_blocks, self.engine.config.block_size
        wanted = response.blocks[local:]  # what this worker's pool lacks
        fetched = self.cache.pull(wanted, time_left(deadline))
        cached_blocks = max(0, response.num_cached_tokens // bs - local)
        tokens = sum(ref.num_tokens for ref in wanted[:len(fetched.payloads)])
        self._take(kv, fetched, self.engine.stage_blocks(fetched.payloads), tokens, cached_blocks)
        kv.cached_upto = response.num_cached_tokens
        full = [ref for ref in response.blocks if ref.WhichOneof("key") == "block_hash"]
        kv.held_blocks = next((i for i, ref in enumerate(full) if not ref.store_address), len(full))
        self.policy.observe_prefill_call(kv.prefill_s + kv.pull_s, response.timing.compute_ms / 1000.0,
                                         response.num_computed_tokens)

    def _mismatch(self, response: prefill_pb2.PrefillResponse, params: SamplingParams) -> str | None:
        """Why a Prefill answer cannot be trusted here (its K/V and first token came from another
        model, dtype or layout, or were sampled with another seed), or None."""
        ours = self.engine.fingerprint
        if response.fingerprint != ours:
            return f"it was computed under fingerprint {response.fingerprint.hex()}, this worker's is {ours.hex()}"
        if response.seed != params.seed:
            return f"its first token was sampled with seed {response.seed}, the request has {params.seed}"
        return None

    def _take(self, kv: PromptKV, fetched: Fetched, staged: BlockBatch, num_tokens: int, cached_blocks: int) -> None:
        """What a pull brought (staged on this handler thread; the engine thread only scatters it):
        of its blocks, the first `cached_blocks` were cache hits, the rest a hand-off."""
        kv.blocks, kv.num_tokens, kv.pull_s = staged, num_tokens, fetched.pull_s
        kv.bytes_pulled = min(len(fetched.payloads), cached_blocks) * self.engine.layout.block_nbytes
        kv.bytes_handoff = fetched.bytes_pulled - kv.bytes_pulled
        if fetched.fallback:
            kv.fallbacks.append(fetched.fallback)


