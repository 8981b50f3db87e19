"""The prefill itself: reuse every cached block, compute only the rest, ship new blocks to the stores.

Flow of one request (handler thread unless noted):
1. the shared prefix fetcher (kvcluster.worker.prefix_fetch, as decode uses it): chained hashes of the
   prompt's full blocks (once), how many this worker's own pool holds (the local tier), one Redis
   lookup of them all (their holders become decode's references), a pull of the cached blocks
   past the local ones;
2. on the engine thread: the engine takes the local blocks and the pulled ones and queues the
   prompt, which it batches with other prompts and computes in chunks (a prompt whose next block
   another prompt is computing waits for it instead of computing it twice);
3. after each chunk (engine thread) every full block at hand gets a store reference for decode:
   the lookup's holder, the push of another request that is shipping the same block (`RecentPushes`),
   or a push of its own, handed to a push pool so pushing overlaps the next chunk's compute;
4. when the first token is sampled, the partial tail block is pushed as a request-scoped block and
   the request's references to the worker's blocks are dropped (they stay in the local cache).
At least the last prompt token is always computed: its logits give the first token.
"""

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import grpc

from kvcluster.engine.engine import Engine, Export, PrefixSource
from kvcluster.engine.sampling import SamplingParams
from kvcluster.engine.sequence import FinishReason, Sequence as EngineSeq
from kvcluster.errors import InvalidArgument, RequestFailed
from kvcluster.kv.blocks import BlockHash, check_cache_salt
from kvcluster.kv.index import StoreRef
from kvcluster.proto import common_pb2
from kvcluster.rpc.cache_client import Fetched, KVCacheClient, Pushed
from kvcluster.worker.engine_worker import EngineWorker
from kvcluster.worker.prefix_fetch import PrefixFetcher, PrefixLookup
from prefill_service.metrics import PrefillMetrics


MAX_REQUEST_ID_CHARS = 128  # it names the tail block in the store (request keys are at most 256)
RECENT_PUSHES = 1 << 15     # block hashes remembered with the push that ships them


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


class RecentPushes:
    """The pushes this worker made lately, by block hash. A request that finds a block in the local
    cache which its store lookup missed (another request computed it moments ago and may still be
    pushing it) takes that push's store reference instead of pushing the block again. Thread-safe."""

    def __init__(self, capacity: int = RECENT_PUSHES):
        self.capacity = capacity
        self._entries: OrderedDict[BlockHash, tuple[Future, int, list[float]]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, hashes: Sequence[BlockHash], future: "Future[Pushed]") -> None:
        done_at: list[float] = []  # set when the push ends
        future.add_done_callback(lambda _: done_at.append(time.monotonic()))
        with self._lock:
            for i, block_hash in enumerate(hashes):
                self._entries[block_hash] = (future, i, done_at)
                self._entries.move_to_end(block_hash)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, block_hash: BlockHash, since: float) -> tuple[Future, int] | None:
        """The push shipping `block_hash` if it is still running or ended after `since` (a lookup
        started at `since` could have missed it); an older one may have been evicted since."""
        with self._lock:
            entry = self._entries.get(block_hash)
        if entry is None:
            return None
        future, index, done_at = entry
        if done_at and done_at[0] < since:
            return None
        return future, index


class Prefiller:
    """Prefill requests against one EngineWorker and the shared cache."""

    def __init__(self, worker: EngineWorker, cache: KVCacheClient | None, metrics: PrefillMetrics,
                 lease_seconds: int = 30, push_threads: int = 4):
        self.worker = worker
        self.cache = cache
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self._pushers = ThreadPoolExecutor(push_threads, thread_name_prefix="push")
        self.recent = RecentPushes()
        self.fetcher = PrefixFetcher(worker.engine, cache)

    def close(self) -> None:
        self._pushers.shutdown(wait=True)

    def push_export(self, keys: Sequence[bytes | str], export: Export) -> Pushed:
        """On a pusher thread: the blocks' bytes (read here, not on the engine thread), then the push."""
        payloads = self.worker.read_export(export)
        return self.cache.push(list(zip(keys, export.tokens, payloads)), self.lease_seconds)

    def prefill(self, request_id: str, token_ids: Sequence[int], params: SamplingParams,
                bypass_cache: bool = False, context: grpc.ServicerContext | None = None,
                cache_salt: str = "") -> PrefillOutcome:
        """`context` (the gRPC call) ends the work when the caller leaves or its deadline passes."""
        return self.start(request_id, token_ids, params, bypass_cache, context, cache_salt).finish()

    def start(self, request_id: str, token_ids: Sequence[int], params: SamplingParams,
              bypass_cache: bool = False, context: grpc.ServicerContext | None = None,
              cache_salt: str = "") -> "Started":
        """Everything up to the first token: fetch the cached prefix, compute the rest (its blocks'
        pushes start as chunks complete). `finish()` then waits for the pushes."""
        start = time.perf_counter()
        engine = self.worker.engine
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument("request_id", f"has {len(request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
        engine.check_prompt(token_ids, field="token_ids")
        check_cache_salt(cache_salt)
        params = params.with_seed()
        params.validate(engine.model_config.vocab_size, engine.model_config.context_length)
        lookup_at = time.monotonic()  # a push that ended after this may be missing from the lookup
        found = self.fetcher.lookup(token_ids, cache_salt, use_cache=not bypass_cache, look_up_local=True)
        source, fetched = self.fetcher.pull(found)
        job = _Job(self, source, found, self.cache if not bypass_cache else None, lookup_at, cache_salt,
                   f"{request_id or 'prefill'}/{uuid.uuid4().hex[:12]}")
        compute_start = time.perf_counter()
        first_token = self._compute(job, token_ids, params, context)
        return Started(self, job, fetched, first_token, params.seed, len(token_ids), start,
                       time.perf_counter() - compute_start)

    def _compute(self, job: "_Job", token_ids, params: SamplingParams, context: grpc.ServicerContext | None) -> int:
        """Run the prompt through the engine; returns the first token. The engine knows the job by
        its own unique key: callers' request ids may repeat."""
        if context is not None and not context.add_callback(lambda: self.worker.cancel(job.tail_key)):
            raise RequestFailed("the caller left before the prompt was computed")
        try:
            events = list(self.worker.stream(
                lambda engine: job.admit(engine, token_ids, first_token_only(params))))
        finally:
            if job.seq is not None:
                self.worker.call(job.finish)
        if not events:  # cancelled: the caller left or its deadline passed
            raise RequestFailed("cancelled: the caller left or its deadline passed")
        return events[0].token_id


def first_token_only(params: SamplingParams) -> SamplingParams:
    """The request's sampling for its first token alone (min_tokens kept as far as it bears on it)."""
    return replace(params, max_tokens=1, stop=(), min_tokens=min(params.min_tokens, 1))


@dataclass
class Started:
    """A prefill whose first token is sampled; its new blocks may still be on their way to a store."""

    prefiller: Prefiller
    job: "_Job"
    fetched: Fetched
    first_token: int
    seed: int
    num_prompt_tokens: int
    started_at: float
    compute_s: float

    def finish(self) -> PrefillOutcome:
        """Wait for the pushes: every block's store reference, and what the request cost."""
        compute_end = time.perf_counter()
        fetched, prefiller = self.fetched, self.prefiller
        fallbacks = [fetched.fallback] if fetched.fallback else []
        refs, bytes_pushed = self.job.collect(fallbacks)
        computed = self.job.seq.sources.computed
        outcome = PrefillOutcome(
            first_token_id=self.first_token, seed=self.seed, blocks=refs,
            num_cached_tokens=self.num_prompt_tokens - computed, num_computed_tokens=computed,
            lookup_s=fetched.lookup_s, pull_s=fetched.pull_s, compute_s=self.compute_s,
            push_s=time.perf_counter() - compute_end, bytes_pulled=fetched.bytes_pulled,
            bytes_pushed=bytes_pushed, fallbacks=fallbacks)
        outcome.total_s = time.perf_counter() - self.started_at
        prefiller.metrics.observe_request(self.job.seq.sources, outcome.total_s)
        prefiller.metrics.observe(fallbacks, fetched.lookup_s)
        return outcome


@dataclass
class _Job:
    """One prompt's state on the engine thread: where each of its full blocks is held in a store."""

    prefiller: Prefiller
    prefix: PrefixSource      # hashes (computed once) and the blocks pulled past the local ones
    found: PrefixLookup       # the token ids of each full block and the store lookup's answer
    cache: KVCacheClient | None
    lookup_at: float
    cache_salt: str
    tail_key: str
    seq: EngineSeq | None = None
    covered: int = 0          # leading full blocks that have a store reference (or a push on the way)
    refs: dict = field(default_factory=dict)   # block index -> StoreRef | (Future[Pushed], index)
    own: list = field(default_factory=list)    # this job's pushes: (first block index, Future[Pushed])

    def admit(self, engine: Engine, token_ids, params: SamplingParams) -> EngineSeq:
        self.seq = engine.add_request(token_ids, params, self.tail_key, keep_blocks=True, prefix=self.prefix,
                                      cache_salt=self.cache_salt, use_cache=self.cache is not None)
        self.seq.on_chunk = lambda seq: self._cover(engine, seq)
        self._cover(engine, self.seq)  # the blocks at hand already
        return self.seq

    def _cover(self, engine: Engine, seq: EngineSeq) -> None:
        """Give every full prompt block at hand a store reference: the lookup's holder, a push of the
        same block already on its way, or a push of ours (one gather per run of blocks)."""
        if self.cache is None:
            return
        ready = min(seq.num_computed, len(seq.prompt_ids)) // engine.config.block_size
        todo: list[int] = []
        for i in range(self.covered, ready):
            held = self.found.holder(i) or self.prefiller.recent.get(self.prefix.hashes[i], self.lookup_at)
            if held is not None:
                self.refs[i] = held
            else:
                todo.append(i)
        self.covered = max(self.covered, ready)
        for first, last in _runs(todo):
            self._push(engine, engine.export_blocks(seq, first, last))

    def finish(self, engine: Engine) -> None:
        """After the first token: push the tail block, then drop the request's references to its blocks."""
        if self.seq.finish_reason not in (None, FinishReason.CANCELLED) and self.cache is not None:
            full = len(self.seq.prompt_ids) // engine.config.block_size
            self._push(engine, engine.export_blocks(self.seq, full, with_tail=True, upto_tokens=len(self.seq.prompt_ids)),
                       tail=True)
        engine.release(self.seq)

    def _push(self, engine: Engine, export, tail: bool = False) -> None:
        if export is None:
            return
        keys = list(export.hashes) + ([self.tail_key] if tail else [])
        future = self.prefiller._pushers.submit(self.prefiller.push_export, keys, export)
        self.prefiller.recent.add(export.hashes, future)
        for offset in range(len(keys)):
            self.refs[export.first + offset] = (future, offset)
        self.own.append(future)

    def collect(self, fallbacks: list[str]) -> tuple[list[common_pb2.BlockRef], int]:
        """Wait for the pushes; every block's reference in prompt order (a block whose push failed
        keeps no holder), and the bytes this job pushed."""
        moved = 0
        for future in self.own:
            pushed = future.result()
            moved += pushed.bytes_pushed
            if pushed.fallback:
                fallbacks.append(pushed.fallback)
        refs = []
        for i in sorted(self.refs):
            held = self.refs[i]
            if isinstance(held, StoreRef):
                refs.append(common_pb2.BlockRef(block_hash=self.prefix.hashes[i], token_ids=self.found.token_blocks[i],
                                                num_tokens=len(self.found.token_blocks[i]), store_id=held.store_id,
                                                store_address=held.address))
            else:
                future, index = held
                refs.append(future.result().refs[index])
        return refs, moved


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """[first, last) runs of consecutive indices."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
