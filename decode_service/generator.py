"""Generate: tokenize the input, get the prompt's KV, join the continuous batch, stream tokens.

Runs on a gRPC handler thread; only the EngineWorker's thread touches the model and the pool.
A finished request's new full blocks (prompt + output) are pushed to the cache in the
background (`cache_generated`), so the next turn of a chat finds its history cached.
"""

import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import grpc

from decode_service.metrics import DecodeMetrics
from decode_service.prompt_kv import PromptKV, PromptKVSource
from decode_service.verifier import Verifier
from kvcluster.engine.engine import Engine, Export
from kvcluster.engine.sequence import Sequence as EngineSeq, TokenEvent
from kvcluster.errors import InvalidArgument
from kvcluster.kv.blocks import check_cache_salt
from kvcluster.model.tokenizer import ChatMessage
from kvcluster.proto import decode_pb2
from kvcluster.rpc.cache_client import KVCacheClient
from kvcluster.rpc.messages import FINISH_REASONS, logprobs_to_proto, sampling_from_proto
from kvcluster.worker.engine_worker import EngineWorker

MS = 1000.0
PROMPT_SOURCES = ("local_cache", "store", "prefill", "local_computed")  # Usage fields <source>_tokens


def check_resume(resume: list[int], params, vocab_size: int) -> list[int]:
    """The resumed tokens, or InvalidArgument: fewer than max_tokens, each in the vocabulary."""
    if len(resume) >= params.max_tokens:
        raise InvalidArgument("resume_token_ids", f"has {len(resume)} tokens; must be fewer than "
                              f"sampling.max_tokens ({params.max_tokens})")
    bad = next((t for t in resume if t >= vocab_size), None)
    if bad is not None:
        raise InvalidArgument("resume_token_ids", f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return resume


class _Clock:
    """A stream's timing: the first response observes the time to first token, each later one the
    inter-token latency."""

    def __init__(self, metrics: DecodeMetrics, arrival: float):
        self.metrics, self.arrival = metrics, arrival
        self.first: float | None = None
        self.last: float | None = None

    def respond(self, event: TokenEvent) -> decode_pb2.GenerateResponse:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.arrival)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        response = decode_pb2.GenerateResponse(text=event.text, token_ids=[event.token_id])
        if event.logprobs is not None:
            response.logprobs.append(logprobs_to_proto(event.logprobs))
        if event.finish_reason is not None:
            response.finish_reason = FINISH_REASONS[event.finish_reason]
        return response


# The write-behind of a finished request's blocks (Generator._push_export): blocks per push, and how
# long in all it lets the engine's requests go first.
PUSH_GROUP_BLOCKS = 8
PUSH_YIELD_S = 1.0
PUSH_SETTLE_S = 0.05  # the engine idle this long first: a client's next request comes within it


class Generator:
    """The Generate logic, independent of gRPC plumbing."""

    def __init__(self, worker: EngineWorker, source: PromptKVSource, cache: KVCacheClient | None,
                 metrics: DecodeMetrics, cache_generated: bool = True, lease_seconds: int = 30,
                 max_pending_pushes: int = 8, verifier: Verifier | None = None):
        self.worker = worker
        self.verifier = verifier
        self.source = source
        self.cache = cache
        self.metrics = metrics
        self.cache_generated = cache_generated and cache is not None
        self.lease_seconds = lease_seconds
        self.max_pending_pushes = max_pending_pushes
        self._pushers = ThreadPoolExecutor(2, thread_name_prefix="push-generated")
        self._pending: set[Future] = set()

    def close(self) -> None:
        self._pushers.shutdown(wait=True)
        if self.verifier is not None:
            self.verifier.close()

    def flush_pushes(self, timeout_s: float = 10.0) -> None:
        """Wait until every finished request's blocks have been pushed (tests; graceful stop)."""
        self.worker.call(lambda engine: None, timeout_s)  # exports queued before now have run
        for future in list(self._pending):
            future.result(timeout_s)

    def tokenize(self, request: decode_pb2.GenerateRequest) -> tuple[list[int], str]:
        """Prompt token ids and the name of the input field they came from."""
        tokenizer = self.worker.engine.tokenizer
        which = request.WhichOneof("input")
        if which == "prompt":
            return tokenizer.encode_prompt(request.prompt), "prompt"
        if which == "messages":
            messages = [ChatMessage(m.role, m.content) for m in request.messages.messages]
            return tokenizer.encode_chat(messages), "messages"
        if which == "token_ids":
            return list(request.token_ids.ids), "token_ids"
        raise InvalidArgument("input", "set one of prompt, messages or token_ids")

    def generate(self, request: decode_pb2.GenerateRequest, context: grpc.ServicerContext | None = None
                 ) -> Iterator[decode_pb2.GenerateResponse]:
        arrival = time.perf_counter()
        engine = self.worker.engine
        prompt_ids, field = self.tokenize(request)
        engine.check_prompt(prompt_ids, field)
        cache_salt = check_cache_salt(request.cache_salt)
        params = sampling_from_proto(request.sampling).with_seed()
        engine.check_sampling(params)  # bounds, and the grammar compiled here rather than on the engine thread
        resume = check_resume(list(request.resume_token_ids), params, engine.model_config.vocab_size)
        request_id = uuid.uuid4().hex
        use_cache = not request.bypass_cache
        time_left = context.time_remaining() if context is not None else None
        kv = (self.source.fetch(request_id, prompt_ids, params.for_first_token_elsewhere(), time_left, cache_salt)
              if use_cache else PromptKV())
        kv.use_cache, kv.cache_salt = use_cache, cache_salt
        early = self._send_handoff_token(kv, request_id, prompt_ids, params) if not resume else None
        clock = _Clock(self.metrics, arrival)
        if early is not None:
            yield clock.respond(early)
        if kv.finish_handoff is not None:
            kv.finish_handoff()
        self.metrics.observe(kv.fallbacks, kv.lookup_s)
        if kv.decision is not None:
            remote, reason = kv.decision
            self.metrics.prefill_decisions.labels("remote" if remote else "local", reason).inc()
        if context is not None and not context.is_active():
            return  # cancelled or past its deadline while the KV was being fetched: do no more work
        keep = self.cache_generated and use_cache
        holder: list[EngineSeq] = []

        def admit(engine: Engine) -> EngineSeq:
            seq = self._admit(engine, request_id, prompt_ids, params, kv, keep, resume)
            holder.append(seq)
            return seq

        if context is not None:  # a cancelled or expired call leaves the batch at once
            context.add_callback(lambda: self.worker.cancel(request_id))
        sent = max(len(resume), 1 if early is not None else 0)  # leading tokens the client has already
        count = 0
        finished = False
        served: list[int] = []
        try:
            for event in self.worker.stream(admit):
                count += 1
                served.append(event.token_id)
                if count <= sent and event.finish_reason is None:
                    continue
                response = clock.respond(event)
                if event.finish_reason is not None:
                    finished = True
                    usage = self._usage(prompt_ids, kv, holder[0] if holder else None, count, arrival, clock.first)
                    response.usage.CopyFrom(usage)
                    for source in PROMPT_SOURCES:
                        self.metrics.prompt_tokens.labels(source).inc(getattr(usage, f"{source}_tokens"))
                    warm = usage.local_computed_tokens < usage.prompt_tokens
                yield response
        finally:
            if finished and keep and holder:
                self.worker.submit(lambda eng: self._push_generated(eng, holder[0], kv.held_blocks))
        if finished and self.verifier is not None:
            self.verifier.maybe_verify(request_id, prompt_ids, params, served, kv.hashes, warm)
        self.metrics.latency.observe(time.perf_counter() - arrival)
        self.metrics.generation_tokens.inc(max(0, count - len(resume)))

    def _send_handoff_token(self, kv: PromptKV, request_id: str, prompt_ids: list[int], params) -> TokenEvent | None:
        """The event of a hand-off's first token, to send before its blocks are pulled (the prefill
        replica's pushes and the pull then stay off the time to first token); None when there is
        none or when it ends the request (the engine then says so in the usual way). The engine's
        sequence later computes this same event from the same prompt, params and token."""
        if kv.finish_handoff is None or kv.first_token is None or params.needs_own_first_token:
            return None
        engine = self.worker.engine
        preview = EngineSeq.create(request_id, prompt_ids, params, engine.tokenizer, engine.model_config.context_length)
        event = preview.append_token(kv.first_token)
        return event if event.finish_reason is None else None

    def _admit(self, engine: Engine, request_id: str, prompt_ids: list[int], params, kv: PromptKV, keep: bool,
               resume: list[int]) -> EngineSeq:
        """On the engine thread: the engine takes what the local cache holds, then the pulled blocks.
        Resumed tokens are handed over as output (the prefill service's first token is then the
        same as their first and is not needed). A prefill worker's first token serves only when it
        carries nothing the request streams from here (logprobs, grammar state): else this worker
        recomputes the prompt's last token, whose K/V it pulled anyway."""
        first = [kv.first_token] if kv.first_token is not None and not params.needs_own_first_token else []
        handed = resume or first
        return engine.add_request(prompt_ids, params, request_id, output_ids=handed, keep_blocks=keep,
                                  prefix=kv.prefix(), cache_salt=kv.cache_salt, use_cache=kv.use_cache)

    def _push_generated(self, engine: Engine, seq: EngineSeq, held_blocks: int) -> None:
        """On the engine thread: snapshot the finished sequence's full blocks the store does not hold
        yet (one gather), release it (its blocks stay in the local cache); copy to host and push off
        the engine thread. When max_pending_pushes requests' blocks already wait (a slow or stuck
        store), these are dropped and counted instead."""
        if len(self._pending) >= self.max_pending_pushes:
            engine.release(seq)
            self.metrics.pushes_dropped.inc()
            return
        export = engine.export_blocks(seq, held_blocks)
        engine.release(seq)
        if export is not None:
            future = self._pushers.submit(self._push_export, export)
            self._pending.add(future)
            future.add_done_callback(self._pending.discard)

    def _push_export(self, export: Export) -> None:
        """On a pusher thread: a write-behind that yields to requests. The blocks go in groups of
        PUSH_GROUP_BLOCKS, each read here (not on the engine thread) and sent only once the engine
        has nothing to run, or once PUSH_YIELD_S has passed since the first (so a busy worker still
        shares its blocks): a request that arrives right after another finished no longer waits
        behind its predecessor's copies (TTFT warm right after cold, 1,024 tokens: ~70-120 ms with
        one push at once, see docs/design.md)."""
        deadline = time.monotonic() + PUSH_YIELD_S
        group = PUSH_GROUP_BLOCKS if export.batch is None else len(export.hashes)
        try:
            for start in range(0, len(export.hashes), group):
                self.worker.wait_idle(max(0.0, deadline - time.monotonic()), PUSH_SETTLE_S)
                part = slice(start, start + group)
                payloads = export.payloads(part)
                self.cache.push(list(zip(export.hashes[part], export.tokens[part], payloads)), self.lease_seconds)
        finally:
            self.worker.unpin(export)

    @staticmethod
    def _usage(prompt_ids: Sequence[int], kv: PromptKV, seq: EngineSeq | None, completion: int, arrival: float,
               first: float) -> decode_pb2.Usage:
        """Where the prompt's KV came from, by the engine's account: its local cache, blocks pulled
        (from the store, or computed by the prefill service), or computed here."""
        sources = seq.sources if seq is not None else None
        local = sources.local_cache if sources else 0
        pulled = sources.pulled if sources else 0
        start = sources.pulled_start if sources else 0  # pulled tokens before cached_upto came from the store
        store = max(0, min(start + pulled, kv.cached_upto) - start)
        computed_here = len(prompt_ids) - local - pulled
        return decode_pb2.Usage(
            prompt_tokens=len(prompt_ids), cached_tokens=local + store, computed_tokens=len(prompt_ids) - local - store,
            local_cache_tokens=local, store_tokens=store, prefill_tokens=pulled - store,
            local_computed_tokens=computed_here, completion_tokens=completion,
            bytes_pulled=kv.bytes_pulled, bytes_handoff=kv.bytes_handoff,
            timing=decode_pb2.Timing(lookup_ms=kv.lookup_s * MS, prefill_ms=kv.prefill_s * MS, kv_pull_ms=kv.pull_s * MS,
                                     first_token_ms=(first - arrival) * MS,
                                     total_ms=(time.perf_counter() - arrival) * MS))
