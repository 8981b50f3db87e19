"""The in-process engine: continuous batching over a paged KV pool, in three parts.

- `Scheduler` (scheduler.py) decides each step under one token budget: running sequences decode
  first, waiting prompts fill the rest with chunks of their uncached tokens in the same forward
  (Sarathi-style), prefix hits come from the block manager, and a pool too short for the decodes
  preempts by recompute (vLLM's policy). Sampling is stateless per step, so a preempted sequence
  continues exactly where it stopped.
- `BlockManager` (kvcluster/kv/block_manager.py): reference counts, free slots and the hash index of
  full blocks, i.e. the worker-local prefix cache (the first KV tier, vLLM's automatic prefix
  caching); `KVPool` is only the tensor.
- `ModelRunner` (model_runner.py): a step's sequences through one forward, failures isolated.

The engine is the seam the services talk to (vLLM's KV connector split): callers hand in what they
fetched from the second tier (the cache store) as a `PrefixSource` and take blocks out with
`export_blocks`; `local_prefix_blocks` and `stage_blocks` are the only things other threads ask of
it. Nobody outside reaches into the pool or the block manager.
"""

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvcluster.engine.logits_processors import pick
from kvcluster.engine.model_runner import ModelRunner
from kvcluster.engine.sampling import SamplingParams
from kvcluster.engine.sampling_params import check_prompt_ids
from kvcluster.engine.scheduler import Scheduler, StepPlan
from kvcluster.engine.sequence import Sequence, TokenEvent
from kvcluster.engine.structured_output import Grammars
from kvcluster.errors import InvalidArgument, RequestFailed, ResourceExhausted
from kvcluster.kv.block_io import BlockBatch, batch_from_payloads, batch_to_payloads
from kvcluster.kv.block_manager import BlockManager
from kvcluster.kv.blocks import BlockHash, Fingerprint, chain_root, extend_hashes, fingerprint_key, make_fingerprint
from kvcluster.kv.device import default_device
from kvcluster.kv.dtypes import DTYPE_NAMES, DTYPES, resolve_dtype
from kvcluster.kv.pool import KVPool
from kvcluster.model.llama import LlamaModel, LlamaWeights, ModelConfig, PrefillSeq
from kvcluster.model.loader import build_model, load_model, model_identity
from kvcluster.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
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
    """Blocks taken out of the pool for pushing: their keys' token ids, and either one gathered
    snapshot (a device pool) or, in a host-memory pool, the slots themselves, pinned (one more
    reference each) so nothing can overwrite them until `Engine.unpin` on the engine thread.

    A pinned export costs the engine thread nothing: the pusher reads each block's bytes straight
    from the pool (one copy), where a gather on the engine thread cost 15-75 ms per 64 blocks
    (mostly page faults of a fresh buffer) and held up the next request's step."""

    first: int                           # index of the first block in the sequence
    hashes: list[BlockHash]              # one per full block
    tokens: list[list[int]]              # token ids per block (the tail's may be short)
    batch: BlockBatch | None = None      # the gathered snapshot, or None when `slots` are pinned
    slots: list[int] = field(default_factory=list)  # pinned host-memory slots, until unpinned
    pool: KVPool | None = None

    def payloads(self, part: slice = slice(None)) -> list[bytes]:
        """The bytes of blocks `part` in wire format (any thread; a gathered snapshot converts whole)."""
        if self.batch is not None:
            return batch_to_payloads(self.batch)[part]
        return [self.pool.export_block(slot) for slot in self.slots[part]]


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
    """Owns the model, its KV pool and the scheduler. Not thread-safe: one engine thread drives it
    (except `local_prefix_blocks` and `stage_blocks`, which any thread may call)."""

    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, model_digest: bytes, config: EngineConfig = EngineConfig(),
                 cluster_secret: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self._config = config
        self.model_digest = model_digest
        self.layout = model.config.kv_layout(config.block_size, DTYPE_NAMES[model.dtype])
        # The cluster secret keys every block hash (see kvcluster.kv.blocks); "" = no secret.
        # The numerics join the model's identity: the two modes, and batch-invariant kernels built
        # for different instruction sets, compute different K/V bytes.
        self.identity = model_digest + f"|{model.numerics_identity}".encode()
        self.fingerprint: Fingerprint = make_fingerprint(self.identity, self.layout.canonical(),
                                                         fingerprint_key(cluster_secret))
        self.pool = KVPool.from_budget(self.layout, config.kv_capacity_bytes, model.device)
        self.blocks = BlockManager(self.pool.num_blocks)
        self.scheduler = Scheduler(config, self.blocks, self.pool, self.fingerprint)
        self.runner = ModelRunner(model, self.pool)
        self._ids = itertools.count()
        self.last_plan = StepPlan(config.max_prefill_tokens)  # the last step's work (metrics, tests)
        self.failures: list[tuple[str, Exception]] = []  # requests failed alone; see take_failures
        self.prefix_caching = config.prefix_caching
        self.tokens_computed = 0   # prompt tokens this engine computed (deduplication is counted here)
        self.prefill_cost = PrefillCost()
        self.grammars = Grammars(tokenizer, model.config.vocab_size)  # structured output (response_format)
        # Called with (sequences, their logits [n, vocab]) before each sampling: exactness tests, logprobs.
        self.logits_observer: Callable[[list[Sequence], torch.Tensor], None] | None = None

    @property
    def config(self) -> EngineConfig:
        return self._config

    @config.setter
    def config(self, config: EngineConfig) -> None:
        """A new config (tests change the chunking of a live engine) reaches the scheduler too."""
        self._config = self.scheduler.config = config

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def waiting(self) -> deque[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def deferrals(self) -> int:
        return self.scheduler.deferrals

    @property
    def last_step(self) -> tuple[str, int]:
        """("decode" | "prefill" | "mixed" | "idle", sequences in the last forward)."""
        return self.last_plan.kind, len(self.last_plan.items)

    # ---- the KV connector seam (any thread) ------------------------------------------------

    def local_prefix_blocks(self, hashes: Seq[BlockHash]) -> int:
        """How many leading `hashes` this worker's local cache holds now: a hint for the fetcher on
        another thread (a block may be evicted before admission; the scheduler re-checks)."""
        return self.blocks.peek(hashes) if self.prefix_caching else 0

    def stage_blocks(self, payloads: Seq[bytes | bytearray | memoryview]) -> BlockBatch:
        """Fetched wire-format blocks staged for this pool's device (off the engine thread); the
        engine thread only scatters them (`PrefixSource.pulled`)."""
        return batch_from_payloads(payloads, self.layout.block_nbytes, self.pool.ops)

    # ---- requests ------------------------------------------------------------------------

    def check_prompt(self, prompt_ids: Seq[int], field: str = "prompt") -> None:
        """Raise InvalidArgument unless the prompt can be served."""
        check_prompt_ids(prompt_ids, field, self.model_config.context_length, self.model_config.vocab_size)

    def check_sampling(self, params: SamplingParams) -> None:
        """Raise InvalidArgument unless `params` can be served; compiles its grammar (any thread)."""
        params.validate(self.model_config.vocab_size, self.model_config.context_length)
        self.grammars.check(params.structured)

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams, request_id: str | None = None,
                    output_ids: Seq[int] = (), keep_blocks: bool = False, prefix: PrefixSource | None = None,
                    cache_salt: str = "", use_cache: bool = True) -> Sequence:
        """Queue a request. `prefix` hands over the prompt's hashes and blocks fetched from outside;
        `output_ids` tokens already sampled elsewhere (e.g. a prefill worker's first). With
        `use_cache` (and prefix caching on) the sequence shares and registers blocks in the local
        cache. With `keep_blocks` a finished sequence keeps its blocks until the caller's `release(seq)`."""
        self.check_prompt(prompt_ids)
        params.validate(self.model_config.vocab_size, self.model_config.context_length)
        grammar = self.grammars.matcher(params.structured, output_ids) if params.structured else None
        bs = self.config.block_size
        worst = -(-min(len(prompt_ids) + params.max_tokens, self.model_config.context_length) // bs)
        if worst > self.blocks.num_blocks:
            raise ResourceExhausted(f"prompt + max_tokens need {worst} KV blocks; this worker's pool holds {self.blocks.num_blocks}")
        seq = Sequence.create(request_id or f"req-{next(self._ids)}", prompt_ids, params.with_seed(),
                              self.tokenizer, self.model_config.context_length)
        seq.keep_blocks = keep_blocks
        seq.grammar = grammar
        seq.cacheable = use_cache and self.prefix_caching
        seq.hash_root = chain_root(cache_salt)
        if prefix is not None:
            seq.block_hashes = list(prefix.hashes[:len(prompt_ids) // bs])
        self.scheduler.reuse(seq)
        if prefix is not None and prefix.pulled is not None:
            self._load_pulled(seq, prefix)
        if not output_ids:  # with a handed-over token the prompt's last logits are not needed
            self.scheduler.leave_work(seq)
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
        self.scheduler.register(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        self.scheduler.cancel(seq)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- stepping ------------------------------------------------------------------------

    def take_failures(self) -> list[tuple[str, Exception]]:
        """(request id, error) of each request that failed alone since the last call: its blocks are
        already released and it left the queues; the others in its batch carried on."""
        failures, self.failures = self.failures, []
        return failures

    def step(self) -> list[TokenEvent]:
        """One step of the scheduler's plan: every running sequence's next token (up to max_batch)
        and chunks of waiting prompts, one forward, within the token budget (`last_plan` says what
        ran; "idle" when nothing could)."""
        plan = self.last_plan = self.scheduler.schedule()
        if not plan.items:
            if self.waiting and not self.running and self.blocks.num_used == 0:
                # add_request admits only what fits an empty pool: failing the head is the only way on.
                self._fail(self.waiting[0], ResourceExhausted(
                    f"KV pool of {self.blocks.num_blocks} blocks cannot hold this prompt"))
            # Else blocks held by finished sequences (kept for their owners) come back through the
            # owners' commands, or running sequences finish: the prompt waits, nothing fails.
            return []
        start = time.perf_counter()
        items, logits = self.runner.run(plan.items, lambda item, exc: self._fail(
            item.seq, RequestFailed(f"the engine failed on this request: {exc}")))
        if any(not item.decode for item in items):
            self.prefill_cost.observe(sum(item.num_tokens for item in items), time.perf_counter() - start)
        rows, ready, started, decoded = [], [], [], []
        for row, item in enumerate(items):
            seq, completes = item.seq, item.completes
            before = seq.sources.computed
            self.scheduler.computed(item)
            self.tokens_computed += seq.sources.computed - before
            if item.decode:
                decoded.append(seq)
            elif seq.on_chunk is not None and not self._run_hook(seq):
                continue
            if completes:
                rows.append(row)
                ready.append(seq)
                if not item.decode:
                    started.append(seq)
        self.scheduler.start_running(started)
        self.scheduler.rotate(decoded)
        events = self._sample(ready, logits[rows]) if ready else []
        for seq in [s for s in self.running if s.finish_reason]:
            self.running.remove(seq)
            if not seq.keep_blocks:
                self.release(seq)
        return events

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
            picked = pick(logits, seqs)
        except Exception:  # one row's draw failed: sample each alone, fail only the culprit
            if len(seqs) == 1:
                return self._fail_sampling(seqs[0])
            return [event for i, seq in enumerate(seqs) for event in self._sample([seq], logits[i:i + 1])]
        return [seq.append_token(t, lp) for seq, t, lp in zip(seqs, picked.tokens, picked.logprobs)]

    def _fail_sampling(self, seq: Sequence) -> list[TokenEvent]:
        log.exception("sampling failed for request %s", seq.request_id)
        self._fail(seq, InvalidArgument("sampling", "these sampling parameters gave no valid token distribution "
                                        "for this request's logits"))
        return []

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """Take `seq` out of the engine alone: out of the queues, blocks released, error recorded."""
        self.scheduler.cancel(seq)
        self.failures.append((seq.request_id, error))

    # ---- blocks in and out (the pool's owner does the copying) ----------------------------

    def load_blocks(self, batch: BlockBatch) -> list[int] | None:
        """Put staged blocks (see kvcluster.kv.block_io) into free slots with one scatter; their slots,
        or None when the pool cannot spare them now."""
        slots = self.blocks.allocate(batch.num_blocks)
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
        token ids and their bytes to read off the engine thread (`Export`: on a host-memory pool the
        slots are pinned, and the reader hands them back with `unpin`). None when empty."""
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
        hashes = list(seq.block_hashes[first:last])
        if self.pool.ops.host_memory:
            self.blocks.share(slots)
            return Export(first, hashes, blocks, slots=list(slots), pool=self.pool)
        return Export(first, hashes, blocks, self.read_blocks(slots))

    def unpin(self, export: Export) -> None:
        """Drop a pinned export's references once its bytes were read (engine thread)."""
        slots, export.slots = export.slots, []
        self.blocks.free(slots)

    def first_diverging_block(self, seq: Sequence, hashes: Seq[BlockHash]) -> tuple[int | None, int]:
        """Compare `seq`'s leading blocks with the cached blocks the local cache holds under `hashes`
        (the live verifier: `seq` recomputed them without the cache). (index of the first block whose
        bytes differ or None, blocks compared); a block evicted meanwhile is not compared."""
        compared = 0
        for i, (block_hash, slot) in enumerate(zip(hashes, seq.block_table)):
            cached = self.blocks.slot_of(block_hash)
            if cached is None or cached == slot:
                continue
            compared += 1
            if not self.pool.same_bytes(cached, slot):
                return i, compared
        return None, compared

    def reset_prefix_cache(self) -> int:
        """Drop the whole local prefix cache (vLLM's and SGLang's reset_prefix_cache): no block is
        findable by hash any more, running sequences keep theirs; the pool's listener publishes the
        removals. The number of blocks dropped."""
        return len(self.blocks.clear_cache())

    def release(self, seq: Sequence) -> None:
        """Return a sequence's blocks to the pool."""
        self.scheduler.release(seq)

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
        seq.grammar = self.grammars.matcher(params.structured) if params.structured else None
        while seq.finish_reason is None:
            slots = self.blocks.allocate(seq.blocks_needed(seq.num_tokens, self.config.block_size))
            if slots is None:
                raise ResourceExhausted("KV pool too small for a no-cache recompute")
            try:
                logits = self.model.prefill(self.pool.kv, [PrefillSeq(seq.token_ids, 0, slots)])
            finally:
                self.blocks.free(slots)
            if self.logits_observer is not None:
                self.logits_observer([seq], logits)
            picked = pick(logits, [seq])
            yield seq.append_token(picked.tokens[0], picked.logprobs[0])


def load_engine(model_path: str | Path | None = None, device: str | None = None,
                config: EngineConfig = EngineConfig(), dtype: str = "auto", cluster_secret: str = "") -> Engine:
    """Load a GGUF file or a Hugging Face checkpoint directory (the default SmolLM2 when None) in
    `dtype` (see kvcluster.kv.dtypes; `auto` picks the fastest the device runs natively and logs why);
    `cluster_secret` keys its block hashes."""
    device = device or default_device()
    name, why = resolve_dtype(dtype, device)
    log.info("model dtype %s on %s (%s)", name, device, why)
    loaded = load_model(model_path)
    log.info("model %s: %s, %d layers, %d KV heads x %d", loaded.path, loaded.config.architecture,
             loaded.config.num_layers, loaded.config.num_kv_heads, loaded.config.head_dim)
    model = build_model(loaded.config, loaded.weights, device, DTYPES[name], config.deterministic)
    return Engine(model, Tokenizer(loaded.tokenizer), model_identity(loaded.digest, loaded.config), config, cluster_secret)


def random_engine(config: ModelConfig, tokenizer: Tokenizer, seed: int = 0, engine_config: EngineConfig = EngineConfig(),
                  dtype: str = "float32", device: str = "cpu") -> Engine:
    """An engine over seeded random weights (tests of the mechanics)."""
    model = LlamaModel(config, LlamaWeights.random(config, seed), device, DTYPES[dtype], engine_config.deterministic)
    return Engine(model, tokenizer, f"random-{seed}-{config}".encode(), engine_config)
