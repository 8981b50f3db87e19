"""The in-process engine: continuous batching over a paged KV pool.

Each `step()` is either one prefill step (waiting sequences, chunked under a token budget,
batched into one forward) or one decode step (every running sequence advances one token).
Blocks are allocated on demand; when the pool runs dry a running sequence is preempted by
recomputation (its blocks freed, its tokens prefilled again later), as vLLM does. Sampling is
stateless per step, so a preempted sequence continues exactly where it stopped.

The engine owns the worker-local prefix cache (the first KV tier, vLLM's automatic prefix caching):
every full block a cacheable sequence computes is registered in the pool under its chained hash;
a new sequence starts from the longest prefix the pool holds, sharing those physical blocks
(reference counted); finished sequences' blocks stay until the pool needs room (LRU). Callers
hand in what they fetched from the second tier (the cache store) as a `PrefixSource`, and take
blocks out with `export_blocks`: the import/export logic lives here, once. A waiting sequence
whose next block another waiting sequence is about to compute waits for it instead of computing
it too (in-flight deduplication); when every block is cached, only the last token is computed,
in a private copy of its block.
"""

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from kvcluster.block_io import BlockBatch
from kvcluster.blocks import BlockHash, Fingerprint, chain_root, extend_hashes, fingerprint_key, make_fingerprint
from kvcluster.dtypes import DTYPE_NAMES, DTYPES, resolve_dtype
from kvcluster.errors import InvalidArgument, RequestFailed, ResourceExhausted
from kvcluster.kvpool import KVPool
from kvcluster.model.loader import load_model, model_identity
from kvcluster.model.llama import DecodeSeq, LlamaModel, LlamaWeights, ModelConfig, PrefillSeq
from kvcluster.model.sampling import SamplingParams, sample
from kvcluster.model.sequence import FinishReason, Sequence, TokenEvent
from kvcluster.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_BLOCK_SIZE = 16
DEFAULT_KV_BYTES = 1 << 30
# Batch-invariant numerics are the default; the fast kernels are an explicit opt-out (workers:
# --fast-numerics), since only the batch-invariant ones make a cache hit bitwise the cold answer.
# Their cost is measured by bench/determinism.py.
DETERMINISTIC_DEFAULT = True


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine (one pool, one model)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    kv_capacity_bytes: int = DEFAULT_KV_BYTES
    max_batch: int = 16                 # sequences decoded together
    max_prefill_tokens: int = 512       # prompt tokens computed per prefill step (chunking)
    prefix_caching: bool = True         # keep and share full blocks in the pool (the local cache tier)
    deterministic: bool = DETERMINISTIC_DEFAULT  # batch-invariant numerics, where the device has them (LlamaModel.numerics)


@dataclass
class PrefixSource:
    """What a caller brings for a prompt: its block hashes (computed once per request, by the
    caller that also looked them up in the store) and the blocks it fetched from outside."""

    hashes: list[BlockHash]              # chained hashes of the prompt's full blocks
    pulled: BlockBatch | None = None     # fetched blocks, consecutive, in prompt order
    pulled_from: int = 0                 # prompt block index of the first fetched block
    pulled_tokens: int = 0               # tokens they cover (the last block may be a partial tail)


@dataclass
class Export:
    """Blocks taken out of the pool for pushing: their keys' token ids and one gathered snapshot."""

    first: int                           # index of the first block in the sequence
    hashes: list[BlockHash]              # one per full block
    tokens: list[list[int]]              # token ids per block (the tail's may be short)
    batch: BlockBatch


class PrefillCost:
    """This engine's measured prefill cost, as running averages: seconds of a forward of a few
    tokens (its fixed part: reading every weight once) and seconds per token of long forwards."""

    SMALL, LARGE = 16, 64

    def __init__(self):
        self.fixed_s: float | None = None
        self.per_token_s: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= self.SMALL:
            self.fixed_s = ewma(self.fixed_s, seconds)
        elif tokens >= self.LARGE:
            self.per_token_s = ewma(self.per_token_s, seconds / tokens)


def ewma(average: float | None, value: float, weight: float = 0.2) -> float:
    """A running average: `value` itself first, then each new value weighs `weight`."""
    return value if average is None else (1 - weight) * average + weight * value


class Engine:
    """Owns the model and its KV pool. Not thread-safe: one engine thread drives it."""

    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, model_digest: bytes, config: EngineConfig = EngineConfig(),
                 cluster_secret: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_digest = model_digest
        self.layout = model.config.kv_layout(config.block_size, DTYPE_NAMES[model.dtype])
        # The cluster secret keys every block hash (see kvcluster.blocks); "" = no secret.
        # The numerics join the model's identity: the two modes, and batch-invariant kernels built
        # for different instruction sets, compute different K/V bytes.
        self.identity = model_digest + f"|{model.numerics_identity}".encode()
        self.fingerprint: Fingerprint = make_fingerprint(self.identity, self.layout.canonical(),
                                                         fingerprint_key(cluster_secret))
        self.pool = KVPool.from_budget(self.layout, config.kv_capacity_bytes, model.device)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        self.num_preemptions = 0
        self.last_step: tuple[str, int] = ("idle", 0)  # ("prefill" | "decode", sequences in the forward)
        self.failures: list[tuple[str, Exception]] = []  # requests failed alone; see take_failures
        self.prefix_caching = config.prefix_caching
        self.tokens_computed = 0   # prompt tokens this engine computed (deduplication is counted here)
        self.deferrals = 0         # prefill steps a sequence waited for a block another one was computing
        self.prefill_cost = PrefillCost()
        # Called with (sequences, their logits [n, vocab]) before each sampling: exactness tests, logprobs.
        self.logits_observer: Callable[[list[Sequence], torch.Tensor], None] | None = None

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    # ---- requests ------------------------------------------------------------------------

    def check_prompt(self, prompt_ids: Seq[int], field: str = "prompt") -> None:
        """Raise InvalidArgument unless the prompt can be served."""
        limit = self.model_config.context_length - 1
        if not prompt_ids:
            raise InvalidArgument(field, "must not be empty")
        if len(prompt_ids) > limit:
            raise InvalidArgument(field, f"has {len(prompt_ids)} tokens; the limit is {limit} (context {limit + 1} minus one output token)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidArgument("token_ids", f"token id {bad} is outside the vocabulary [0, {vocab})")

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams, request_id: str | None = None,
                    output_ids: Seq[int] = (), keep_blocks: bool = False, prefix: PrefixSource | None = None,
                    cache_salt: str = "", use_cache: bool = True) -> Sequence:
        """Queue a request. `prefix` hands over the prompt's hashes and blocks fetched from outside;
        `output_ids` tokens already sampled elsewhere (e.g. a prefill worker's first). With
        `use_cache` (and prefix caching on) the sequence shares and registers blocks in the local
        cache. With `keep_blocks` a finished sequence keeps its blocks until the caller's `release(seq)`."""
        self.check_prompt(prompt_ids)
        params.validate(self.model_config.vocab_size, self.model_config.context_length)
        bs = self.config.block_size
        worst = -(-min(len(prompt_ids) + params.max_tokens, self.model_config.context_length) // bs)
        if worst > self.pool.num_blocks:
            raise ResourceExhausted(f"prompt + max_tokens need {worst} KV blocks; this worker's pool holds {self.pool.num_blocks}")
        seq = Sequence.create(request_id or f"req-{next(self._ids)}", prompt_ids, params.with_seed(),
                              self.tokenizer, self.model_config.context_length)
        seq.keep_blocks = keep_blocks
        seq.cacheable = use_cache and self.prefix_caching
        seq.hash_root = chain_root(cache_salt)
        if prefix is not None:
            seq.block_hashes = list(prefix.hashes[:len(prompt_ids) // bs])
        self._reuse(seq)
        if prefix is not None and prefix.pulled is not None:
            self._load_pulled(seq, prefix)
        if not output_ids:  # with a handed-over token the prompt's last logits are not needed
            self._leave_work(seq)
        seq.initial_events = [seq.append_token(t) for t in output_ids]
        if seq.finish_reason is not None:  # the handed-over token already ended it
            if not keep_blocks:
                self.release(seq)
            return seq
        queue = self.running if seq.num_computed == seq.num_tokens - 1 and output_ids else self.waiting
        queue.append(seq)
        return seq

    def _load_pulled(self, seq: Sequence, prefix: PrefixSource) -> None:
        """Put the fetched blocks that continue the sequence's prefix into fresh slots (one scatter);
        the full ones join the local cache. Blocks past a gap, or that the pool cannot take now, are
        dropped: the engine computes them instead."""
        bs, have = self.config.block_size, len(seq.block_table)
        if seq.num_computed != have * bs or not prefix.pulled_from <= have < prefix.pulled_from + prefix.pulled.num_blocks:
            return
        skip = have - prefix.pulled_from
        batch = prefix.pulled if skip == 0 else prefix.pulled.rows(skip, prefix.pulled.num_blocks)
        slots = self.load_blocks(batch)
        if slots is None:
            return
        tokens = min(prefix.pulled_tokens - skip * bs, len(seq.prompt_ids) - seq.num_computed)
        seq.block_table += slots
        seq.sources.pulled_start = seq.num_computed
        seq.num_computed += tokens
        seq.sources.pulled += tokens
        seq.sources.last = "pulled"
        self._register(seq)

    def _reuse(self, seq: Sequence) -> None:
        """Extend the sequence's computed prefix with blocks the local cache holds."""
        bs = self.config.block_size
        have = len(seq.block_table)
        if not seq.cacheable or seq.num_computed != have * bs:
            return
        limit = seq.num_tokens // bs
        if have >= limit:
            return
        extend_hashes(self.fingerprint, seq.hash_root, seq.block_hashes, seq.token_ids, bs, limit)
        slots = self.pool.match(seq.block_hashes[have:limit])
        if not slots:
            return
        seq.block_table += slots
        seq.num_computed += len(slots) * bs
        seq.num_registered = len(seq.block_table)
        prompt_hit = min(seq.num_computed, len(seq.prompt_ids)) - min(have * bs, len(seq.prompt_ids))
        seq.sources.local_cache += prompt_hit
        seq.sources.last = "local_cache"

    def _leave_work(self, seq: Sequence) -> None:
        """When every token's K/V is at hand, the last one must still be computed (its logits give
        the next token): copy the last block, shared with others, into a private slot and recompute
        that token there (copy-on-write: a shared block is never written). With no slot to spare,
        give the block back and recompute all of its tokens instead."""
        if seq.num_computed < seq.num_tokens:
            return
        bs, shared = self.config.block_size, seq.block_table[-1]
        copy = self.pool.allocate(1)
        if copy is not None:
            self.pool.copy_slot(shared, copy[0])
            seq.block_table[-1] = copy[0]
            computed = seq.num_tokens - 1
        else:
            seq.block_table.pop()
            computed = len(seq.block_table) * bs
        self.pool.free([shared])
        seq.num_registered = min(seq.num_registered, computed // bs)
        recomputed, seq.num_computed = seq.num_computed - computed, computed
        counted = getattr(seq.sources, seq.sources.last)
        setattr(seq.sources, seq.sources.last, counted - min(counted, recomputed, max(0, len(seq.prompt_ids) - seq.num_computed)))

    def _register(self, seq: Sequence) -> None:
        """Register the sequence's newly completed full blocks in the local cache."""
        if not seq.cacheable:
            return
        bs = self.config.block_size
        full = min(seq.num_computed // bs, len(seq.block_table))
        if full <= seq.num_registered:
            return
        extend_hashes(self.fingerprint, seq.hash_root, seq.block_hashes, seq.token_ids, bs, full)
        for i in range(seq.num_registered, full):
            self.pool.register(seq.block_hashes[i], seq.block_table[i])
        seq.num_registered = full

    def abort(self, request_id: str) -> bool:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    seq.finish_reason = FinishReason.CANCELLED
                    self.release(seq)
                    return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- stepping ------------------------------------------------------------------------

    def take_failures(self) -> list[tuple[str, Exception]]:
        """(request id, error) of each request that failed alone since the last call: its blocks are
        already released and it left the queues; the others in its batch carried on."""
        failures, self.failures = self.failures, []
        return failures

    def step(self) -> list[TokenEvent]:
        """One prefill step if a waiting sequence fits, else one decode step (`last_step` says which,
        or "idle" when nothing could run)."""
        self.last_step = ("idle", 0)
        events = self._prefill_step()
        if events is None:
            events = self._decode_step()
        for seq in [s for s in self.running if s.finish_reason]:
            self.running.remove(seq)
            if not seq.keep_blocks:
                self.release(seq)
        return events

    def _prefill_step(self) -> list[TokenEvent] | None:
        budget, bs = self.config.max_prefill_tokens, self.config.block_size
        chunks: list[tuple[Sequence, int]] = []
        claimed: set[BlockHash] = set()  # blocks that sequences ahead in the queue are computing
        for seq in self.waiting:
            if budget == 0 or len(self.running) + len(chunks) >= self.config.max_batch:
                break
            self._reuse(seq)
            self._leave_work(seq)
            if self._waits_for(seq, claimed):
                self.deferrals += 1
                continue
            count = min(seq.num_tokens - seq.num_computed, budget)
            slots = self.pool.allocate(seq.blocks_needed(seq.num_computed + count, bs))
            if slots is None:
                break
            seq.block_table.extend(slots)
            chunks.append((seq, count))
            budget -= count
        if not chunks:
            if self.waiting and not self.running and self.pool.num_used == 0:
                # add_request admits only what fits an empty pool: failing the head is the only way on.
                self._fail(self.waiting[0], ResourceExhausted(
                    f"KV pool of {self.pool.num_blocks} blocks cannot hold this prompt"))
            # Else blocks held by finished sequences (kept for their owners) come back through the
            # owners' commands, or running sequences finish: the prompt waits, nothing fails.
            return None
        self.last_step = ("prefill", len(chunks))
        start = time.perf_counter()
        chunks, logits = self._forward_isolated(chunks, lambda item: item[0], lambda batch: self.model.prefill(
            self.pool.kv, [PrefillSeq(seq.token_ids[seq.num_computed:seq.num_computed + n], seq.num_computed,
                                      seq.block_table) for seq, n in batch]))
        if chunks:
            self.prefill_cost.observe(sum(n for _, n in chunks), time.perf_counter() - start)
        done = []
        for row, (seq, n) in enumerate(chunks):
            prompt_part = max(0, min(n, len(seq.prompt_ids) - seq.num_computed))
            seq.sources.computed += prompt_part
            self.tokens_computed += prompt_part
            seq.num_computed += n
            self._register(seq)
            if seq.on_chunk is not None and not self._run_hook(seq):
                continue
            if seq.num_computed == seq.num_tokens:
                done.append((seq, row))
        for seq, _ in done:
            self.waiting.remove(seq)
            self.running.append(seq)
        return self._sample([s for s, _ in done], logits[[row for _, row in done]])

    def _waits_for(self, seq: Sequence, claimed: set[BlockHash]) -> bool:
        """True when the next block `seq` would compute is being computed by a sequence ahead of it
        (it then waits a step and takes that block from the cache). Else it claims its own."""
        if not seq.cacheable:
            return False
        bs = self.config.block_size
        extend_hashes(self.fingerprint, seq.hash_root, seq.block_hashes, seq.prompt_ids, bs)  # its prompt's blocks
        nxt = seq.num_computed // bs
        if seq.num_computed % bs == 0 and nxt < len(seq.block_hashes) and seq.block_hashes[nxt] in claimed:
            return True
        claimed.update(seq.block_hashes[nxt:])
        return False

    def _decode_step(self) -> list[TokenEvent]:
        bs = self.config.block_size
        batch = self.running[: self.config.max_batch]
        for seq in list(batch):
            while seq in batch and seq.blocks_needed(seq.num_tokens, bs):
                slots = self.pool.allocate(1)
                if slots is None:
                    self._preempt(batch.pop())
                    continue
                seq.block_table.extend(slots)
        if not batch:
            return []
        self.last_step = ("decode", len(batch))
        batch, logits = self._forward_isolated(batch, lambda seq: seq, lambda seqs: self.model.decode(
            self.pool.kv, [DecodeSeq(seq.token_ids[-1], seq.num_tokens - 1, seq.block_table) for seq in seqs]))
        for seq in batch:
            seq.num_computed = seq.num_tokens
            self._register(seq)
        # Sequences past max_batch rotate to the back so every one advances in turn.
        self.running = self.running[len(batch):] + batch
        return self._sample(batch, logits)

    def _run_hook(self, seq: Sequence) -> bool:
        """A sequence's chunk hook (e.g. prefill's pushes); if it raises, only that sequence fails."""
        try:
            seq.on_chunk(seq)
            return True
        except Exception as exc:
            log.exception("chunk hook failed for request %s", seq.request_id)
            self._fail(seq, RequestFailed(f"handling a computed chunk failed: {exc}"))
            return False

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        if not seqs:
            return []
        if self.logits_observer is not None:
            self.logits_observer(seqs, logits)
        try:
            tokens = sample(logits, [s.params for s in seqs], [len(s.output_ids) for s in seqs])
        except Exception:  # one row's draw failed: sample each alone, fail only the culprit
            if len(seqs) == 1:
                return self._fail_sampling(seqs[0])
            return [event for i, seq in enumerate(seqs) for event in self._sample([seq], logits[i:i + 1])]
        return [seq.append_token(t) for seq, t in zip(seqs, tokens)]

    def _fail_sampling(self, seq: Sequence) -> list[TokenEvent]:
        log.exception("sampling failed for request %s", seq.request_id)
        self._fail(seq, InvalidArgument("sampling", "these sampling parameters gave no valid token distribution "
                                        "for this request's logits"))
        return []

    def _forward_isolated(self, items: list[T], seq_of: Callable[[T], Sequence],
                          forward: Callable[[list[T]], torch.Tensor]) -> tuple[list[T], torch.Tensor]:
        """`forward(items)` (logits, one row per item). If it raises, each item runs alone and the
        ones that still raise are failed: one request's failure never fails its batch. K/V writes
        are idempotent (same tokens, same slots), so re-running a sequence is safe."""
        try:
            return items, forward(items)
        except Exception as exc:
            if len(items) == 1:
                log.exception("forward failed for request %s", seq_of(items[0]).request_id)
                self._fail(seq_of(items[0]), RequestFailed(f"the engine failed on this request: {exc}"))
                return [], torch.empty(0)
        kept, rows = [], []
        for item in items:
            alone, logits = self._forward_isolated([item], seq_of, forward)
            kept += alone
            rows += [logits] if alone else []
        return kept, torch.cat(rows) if rows else torch.empty(0)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """Take `seq` out of the engine alone: out of the queues, blocks released, error recorded."""
        for queue in (self.waiting, self.running):
            if seq in queue:
                queue.remove(seq)
        seq.finish_reason = FinishReason.CANCELLED
        self.release(seq)
        self.failures.append((seq.request_id, error))

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it prefills again later (its registered blocks may
        still be in the local cache then)."""
        self.num_preemptions += 1
        self.running.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table, seq.num_computed, seq.num_registered = [], 0, 0
        self.waiting.appendleft(seq)

    # ---- blocks in and out (the pool's owner does the copying) ----------------------------

    def load_blocks(self, batch: BlockBatch) -> list[int] | None:
        """Put staged blocks (see kvcluster.block_io) into free slots with one scatter; their slots,
        or None when the pool cannot spare them now."""
        slots = self.pool.allocate(batch.num_blocks)
        if slots:
            self.pool.write(slots, batch)
        return slots

    def read_blocks(self, slots: Seq[int]) -> BlockBatch:
        """A snapshot of `slots` (one gather); turn it into bytes off the engine thread."""
        return self.pool.read(slots)

    def export_blocks(self, seq: Sequence, first: int, last: int | None = None, with_tail: bool = False,
                      upto_tokens: int | None = None) -> Export | None:
        """Snapshot the sequence's full blocks [first, last) of its first `upto_tokens` computed
        tokens (default all computed) and, `with_tail`, the partial block after them: their hashes,
        token ids and one gather, for the caller to push off the engine thread. None when empty."""
        bs = self.config.block_size
        tokens = seq.token_ids[:min(seq.num_computed, seq.num_tokens if upto_tokens is None else upto_tokens)]
        full = len(tokens) // bs
        last = full if last is None else min(last, full)
        extend_hashes(self.fingerprint, seq.hash_root, seq.block_hashes, seq.token_ids, bs, last)
        blocks = [tokens[i * bs:(i + 1) * bs] for i in range(first, last)]
        slots = seq.block_table[first:last]
        if with_tail and len(tokens) % bs and last == full:
            blocks.append(tokens[last * bs:])
            slots.append(seq.block_table[last])
        if not slots:
            return None
        return Export(first, list(seq.block_hashes[first:last]), blocks, self.read_blocks(slots))

    def first_diverging_block(self, seq: Sequence, hashes: Seq[BlockHash]) -> tuple[int | None, int]:
        """Compare `seq`'s leading blocks with the cached blocks the local cache holds under `hashes`
        (the live verifier: `seq` recomputed them without the cache). (index of the first block whose
        bytes differ or None, blocks compared); a block evicted meanwhile is not compared."""
        compared = 0
        for i, (block_hash, slot) in enumerate(zip(hashes, seq.block_table)):
            cached = self.pool.slot_of(block_hash)
            if cached is None or cached == slot:
                continue
            compared += 1
            if not self.pool.same_bytes(cached, slot):
                return i, compared
        return None, compared

    def release(self, seq: Sequence) -> None:
        """Return a sequence's blocks to the pool."""
        self.pool.free(seq.block_table)
        seq.block_table = []

    # ---- convenience drivers (CLI, tests, benchmarks) ---------------------------------------

    def generate(self, prompt_ids: Seq[int], params: SamplingParams, use_cache: bool = True) -> Iterator[TokenEvent]:
        """Stream one request's tokens (other queued requests advance alongside); without `use_cache`
        the local cache is neither read nor filled."""
        seq = self.add_request(prompt_ids, params, use_cache=use_cache)
        while seq.finish_reason is None:
            yield from (e for e in self.step() if e.request_id == seq.request_id)

    def generate_batch(self, prompts: Seq[Seq[int]], params: SamplingParams, use_cache: bool = True) -> list[list[int]]:
        """Output ids of several prompts run together with continuous batching."""
        seqs = [self.add_request(p, params, use_cache=use_cache) for p in prompts]
        while any(s.finish_reason is None for s in seqs):
            self.step()
        return [s.output_ids for s in seqs]

    def generate_no_cache(self, prompt_ids: Seq[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """The exactness reference: recompute the whole sequence from scratch for every token."""
        self.check_prompt(prompt_ids)
        params.validate(self.model_config.vocab_size, self.model_config.context_length)
        seq = Sequence.create("no-cache", prompt_ids, params.with_seed(), self.tokenizer, self.model_config.context_length)
        while seq.finish_reason is None:
            slots = self.pool.allocate(seq.blocks_needed(seq.num_tokens, self.config.block_size))
            if slots is None:
                raise ResourceExhausted("KV pool too small for a no-cache recompute")
            try:
                logits = self.model.prefill(self.pool.kv, [PrefillSeq(seq.token_ids, 0, slots)])
            finally:
                self.pool.free(slots)
            if self.logits_observer is not None:
                self.logits_observer([seq], logits)
            yield seq.append_token(sample(logits, [seq.params], [len(seq.output_ids)])[0])


def load_engine(model_path: str | Path | None = None, device: str | None = None,
                config: EngineConfig = EngineConfig(), dtype: str = "auto", cluster_secret: str = "") -> Engine:
    """Load a GGUF file or a Hugging Face checkpoint directory (the default SmolLM2 when None) in
    `dtype` (see kvcluster.dtypes; `auto` picks the fastest the device runs natively and logs why);
    `cluster_secret` keys its block hashes."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name, why = resolve_dtype(dtype, device)
    log.info("model dtype %s on %s (%s)", name, device, why)
    loaded = load_model(model_path)
    log.info("model %s: %s, %d layers, %d KV heads x %d", loaded.path, loaded.config.architecture,
             loaded.config.num_layers, loaded.config.num_kv_heads, loaded.config.head_dim)
    model = LlamaModel(loaded.config, loaded.weights, device, DTYPES[name], config.deterministic)
    return Engine(model, Tokenizer(loaded.tokenizer), model_identity(loaded.digest, loaded.config), config, cluster_secret)


def random_engine(config: ModelConfig, tokenizer: Tokenizer, seed: int = 0, engine_config: EngineConfig = EngineConfig(),
                  dtype: str = "float32", device: str = "cpu") -> Engine:
    """An engine over seeded random weights (tests of the mechanics)."""
    model = LlamaModel(config, LlamaWeights.random(config, seed), device, DTYPES[dtype], engine_config.deterministic)
    return Engine(model, tokenizer, f"random-{seed}-{config}".encode(), engine_config)
