"""The prefill itself: reuse every cached block, compute only the rest, ship new blocks to the stores.

Flow of one request (handler thread unless noted):
1. chained hashes of the prompt's full blocks; one Redis lookup; pull the longest cached prefix;
2. on the engine thread: import the pulled blocks into the worker pool and queue the prompt, which
   the engine batches with other prompts and computes in chunks of `chunk_tokens`;
3. after each chunk (engine thread) the newly completed full blocks are exported and handed to a
   push pool, so pushing overlaps the next chunk's compute;
4. when the first token is sampled, the partial tail block is pushed as a request-scoped block and
   the worker's blocks are released.
At least the last prompt token is always computed: its logits give the first token.
"""

import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import grpc

from kvcluster.block_io import BlockBatch, batch_from_payloads
from kvcluster.blocks import BlockHash, check_cache_salt, prefix_hashes
from kvcluster.cache_client import Fetched, KVCacheClient, Pushed
from kvcluster.errors import InvalidArgument, RequestFailed
from kvcluster.model.engine import Engine
from kvcluster.model.sampling import SamplingParams
from kvcluster.model.sequence import FinishReason, Sequence as EngineSeq
from kvcluster.proto import common_pb2
from kvcluster.worker import EngineWorker
from prefill_service.metrics import PrefillMetrics


MAX_REQUEST_ID_CHARS = 128  # it names the tail block in the store (request keys are at most 256)


@dataclass
class PrefillOutcome:
    first_token_id: int
    seed: int
    blocks: list[common_pb2.BlockRef]
    num_cached_tokens: int
    num_computed_tokens: int
    lookup_s: float = 0.0
    pull_s: float = 0.0
    compute_s: float = 0.0
    push_s: float = 0.0
    total_s: float = 0.0
    bytes_pulled: int = 0
    bytes_pushed: int = 0
    fallbacks: list[str] = field(default_factory=list)


class Prefiller:
    """Prefill requests against one EngineWorker and the shared cache."""

    def __init__(self, worker: EngineWorker, cache: KVCacheClient | None, metrics: PrefillMetrics,
                 lease_seconds: int = 30, push_threads: int = 4):
        self.worker = worker
        self.cache = cache
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self._pushers = ThreadPoolExecutor(push_threads, thread_name_prefix="push")

    def close(self) -> None:
        self._pushers.shutdown(wait=True)

    def prefill(self, request_id: str, token_ids: Sequence[int], params: SamplingParams,
                bypass_cache: bool = False, context: grpc.ServicerContext | None = None,
                cache_salt: str = "") -> PrefillOutcome:
        """`context` (the gRPC call) ends the work when the caller leaves or its deadline passes."""
        start = time.perf_counter()
        engine = self.worker.engine
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument("request_id", f"has {len(request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
        engine.check_prompt(token_ids, field="token_ids")
        check_cache_salt(cache_salt)
        params = params.with_seed()
        params.validate(engine.model_config.vocab_size, engine.model_config.context_length)
        bs = engine.config.block_size
        cache = None if bypass_cache else self.cache
        hashes = prefix_hashes(engine.fingerprint, token_ids, bs, cache_salt)
        usable = min(len(hashes), (len(token_ids) - 1) // bs)  # keep the last token to compute
        blocks = [list(token_ids[i * bs:(i + 1) * bs]) for i in range(len(hashes))]
        fetched = cache.fetch_prefix(hashes[:usable], blocks[:usable]) if cache else Fetched()
        staged = batch_from_payloads(fetched.payloads, engine.layout.block_nbytes, engine.pool.device)

        pushes: list[tuple[int, Future[Pushed]]] = []
        compute_start = time.perf_counter()
        num_cached_blocks, first_token = self._compute(token_ids, params, request_id, staged, hashes, blocks, cache,
                                                       pushes, context)
        compute_end = time.perf_counter()
        num_cached = num_cached_blocks * bs
        refs = self._cached_refs(hashes, blocks, fetched.holders[:num_cached_blocks])
        fallbacks = [fetched.fallback] if fetched.fallback else []
        bytes_pushed = self._collect_pushes(pushes, refs, fallbacks)
        outcome = PrefillOutcome(
            first_token_id=first_token, seed=params.seed, blocks=refs,
            num_cached_tokens=num_cached, num_computed_tokens=len(token_ids) - num_cached,
            lookup_s=fetched.lookup_s, pull_s=fetched.pull_s, compute_s=compute_end - compute_start,
            push_s=time.perf_counter() - compute_end, bytes_pulled=fetched.bytes_pulled,
            bytes_pushed=bytes_pushed, fallbacks=fallbacks)
        outcome.total_s = time.perf_counter() - start
        self.metrics.observe_request(num_cached, outcome.num_computed_tokens, outcome.total_s)
        self.metrics.observe(fallbacks, fetched.lookup_s)
        return outcome

    def _compute(self, token_ids, params: SamplingParams, request_id: str, staged: BlockBatch,
                 hashes: list[BlockHash], blocks: list[list[int]], cache: KVCacheClient | None,
                 pushes: list, context: grpc.ServicerContext | None) -> tuple[int, int]:
        """Run the prompt through the engine; returns how many pulled blocks it used and the first token.
        The engine knows the job by its own unique key: callers' request ids may repeat."""
        job = _Job(self, staged, hashes, blocks, cache, pushes, f"{request_id or 'prefill'}/{uuid.uuid4().hex[:12]}")
        if context is not None and not context.add_callback(lambda: self.worker.cancel(job.tail_key)):
            raise RequestFailed("the caller left before the prompt was computed")
        try:
            events = list(self.worker.stream(
                lambda engine: job.admit(engine, token_ids, replace(params, max_tokens=1, stop=()))))
        finally:
            if job.seq is not None:
                self.worker.call(job.finish)
        if not events:  # cancelled: the caller left or its deadline passed
            raise RequestFailed("cancelled: the caller left or its deadline passed")
        return job.cached_blocks, events[0].token_id

    @staticmethod
    def _cached_refs(hashes, blocks, holders) -> list[common_pb2.BlockRef]:
        return [common_pb2.BlockRef(block_hash=hashes[i], token_ids=blocks[i], num_tokens=len(blocks[i]),
                                    store_id=store.store_id, store_address=store.address)
                for i, store in enumerate(holders)]

    @staticmethod
    def _collect_pushes(pushes: list, refs: list[common_pb2.BlockRef], fallbacks: list[str]) -> int:
        """Wait for the pushes; append their refs in prompt order (a failed block keeps no holder)."""
        moved = 0
        for _, future in sorted(pushes, key=lambda p: p[0]):
            pushed = future.result()
            moved += pushed.bytes_pushed
            if pushed.fallback:
                fallbacks.append(pushed.fallback)
            refs.extend(pushed.refs)
        return moved


@dataclass
class _Job:
    """One prompt's state on the engine thread: which blocks came from the cache, which are pushed."""

    prefiller: Prefiller
    pulled: BlockBatch     # the cached prefix, staged for the worker's pool
    hashes: list[BlockHash]
    blocks: list[list[int]]
    cache: KVCacheClient | None
    pushes: list
    tail_key: str
    seq: EngineSeq | None = None
    cached_blocks: int = 0
    pushed_upto: int = 0   # full blocks already cached or handed to a push

    def admit(self, engine: Engine, token_ids, params: SamplingParams) -> EngineSeq:
        bs = engine.config.block_size
        # A worker pool too full for the pulled blocks just computes them instead.
        slots = engine.load_blocks(self.pulled) or []
        try:
            self.seq = engine.add_request(token_ids, params, self.tail_key, block_table=slots,
                                          num_computed=len(slots) * bs, keep_blocks=True)
        except BaseException:  # refused at admission: the loaded blocks go back to the pool
            engine.pool.free(slots)
            raise
        self.cached_blocks = self.pushed_upto = len(slots)
        self.seq.on_chunk = lambda seq: self._on_chunk(engine, seq)
        return self.seq

    def _on_chunk(self, engine: Engine, seq: EngineSeq) -> None:
        ready = min(seq.num_computed, len(seq.prompt_ids)) // engine.config.block_size
        if ready > self.pushed_upto:
            self._push(engine, self.pushed_upto, ready, with_tail=False)
            self.pushed_upto = ready

    def finish(self, engine: Engine) -> None:
        """After the first token: push the tail block, then free the worker's blocks."""
        if self.seq.finish_reason not in (None, FinishReason.CANCELLED):
            full = len(self.seq.prompt_ids) // engine.config.block_size
            self._push(engine, self.pushed_upto, full, with_tail=True)
        engine.release(self.seq)

    def _push(self, engine: Engine, first: int, last: int, with_tail: bool) -> None:
        """Snapshot blocks [first, last) (and the tail) here on the engine thread with one gather;
        copy them to host and push them off it."""
        seq, bs = self.seq, engine.config.block_size
        keys, tokens, slots = list(self.hashes[first:last]), list(self.blocks[first:last]), seq.block_table[first:last]
        if with_tail and len(seq.prompt_ids) % bs:
            keys.append(self.tail_key)
            tokens.append(seq.prompt_ids[last * bs:])
            slots.append(seq.block_table[last])
        if keys and self.cache is not None:
            future = self.prefiller._pushers.submit(self.cache.push_batch, keys, tokens, engine.read_blocks(slots),
                                                    self.prefiller.lease_seconds)
            self.pushes.append((first, future))
