"""Real pieces for the fuzz tests (issue 13, "one bad request never hurts another").

A whole cluster in-process: a private redis-server, a cache store, prefill and decode, each on a
free loopback port, the internal token required on push, pull and prefill. The model is loaded
once; prefill and decode each get their own Engine (own KV pool, own engine thread) over the same
read-only weights, since an Engine is driven by exactly one thread.

`SteadyStream` is the well-behaved neighbour: a thread sending one fixed greedy Generate over and
over and checking every answer against tokens computed up front. `Outcome` and `problem_with` judge
what a fuzzed call got back: OK, or INVALID_ARGUMENT naming a field, or RESOURCE_EXHAUSTED, or
UNAUTHENTICATED when the call carried no valid token; never INTERNAL, UNKNOWN or a hang.
"""

import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
import torch

from cache_store.server import StoreServer
from decode_service.config import DecodeConfig
from decode_service.server import DecodeServer, create_server as create_decode
from kvcluster.engine.engine import Engine, EngineConfig
from kvcluster.engine.sampling import SamplingParams
from kvcluster.kv.blocks import prefix_hashes
from kvcluster.model.gguf_loader import load_gguf
from kvcluster.model.llama import LlamaModel
from kvcluster.model.tokenizer import ChatMessage, Tokenizer
from kvcluster.proto import cache_pb2_grpc, common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2_grpc
from kvcluster.rpc.plumbing import make_channel
from kvcluster.rpc.security import INTERNAL_TOKEN_HEADER
from prefill_service.config import PrefillConfig
from prefill_service.server import PrefillServer, create_server as create_prefill
from tests.cluster_fixtures import running_redis, start_store

TOKEN = "fuzz-internal-token"
WITH_TOKEN = ((INTERNAL_TOKEN_HEADER, TOKEN),)
CALL_TIMEOUT_S = 120.0  # a fuzzed call still running after this has hung: that is a failure
ENGINE_CONFIG = EngineConfig(kv_capacity_bytes=64 << 20)  # 91 SmolLM2 blocks: 1,456 tokens per worker
STEADY_MESSAGES = (("system", "You are a concise assistant. Answer in plain words."),
                   ("user", "Name three things a lighthouse keeper does every night."))
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def twin_engines(config: EngineConfig = ENGINE_CONFIG) -> tuple[Engine, Engine]:
    """Two engines (prefill's and decode's) over one loaded copy of SmolLM2 in float32."""
    gguf_model = load_gguf()
    model = LlamaModel(gguf_model.config, gguf_model.weights, "cpu", torch.float32)
    tokenizer = Tokenizer(gguf_model.tokenizer)
    return (Engine(model, tokenizer, gguf_model.digest, config),
            Engine(model, tokenizer, gguf_model.digest, config))


@dataclass
class FuzzCluster:
    """The running services, their ports and one channel to each."""

    store: StoreServer
    prefill: PrefillServer
    decode: DecodeServer
    ports: dict[str, int]
    channels: dict[str, grpc.Channel]
    steady_request: decode_pb2.GenerateRequest
    steady_expected: list[int]

    @property
    def generate(self) -> decode_pb2_grpc.DecodeServiceStub:
        return decode_pb2_grpc.DecodeServiceStub(self.channels["decode"])

    @property
    def prefill_stub(self) -> prefill_pb2_grpc.PrefillServiceStub:
        return prefill_pb2_grpc.PrefillServiceStub(self.channels["prefill"])

    @property
    def store_stub(self) -> cache_pb2_grpc.CacheStoreStub:
        return cache_pb2_grpc.CacheStoreStub(self.channels["cache_store"])

    @property
    def fingerprint(self) -> bytes:
        return self.decode.generator.worker.engine.fingerprint

    def steady_block_hashes(self) -> list[bytes]:
        """Hashes of the steady request's prompt blocks: keys the store really holds once it ran."""
        engine = self.decode.generator.worker.engine
        messages = [ChatMessage(m.role, m.content) for m in self.steady_request.messages.messages]
        return prefix_hashes(engine.fingerprint, engine.tokenizer.encode_chat(messages), engine.config.block_size)


def steady_request(max_tokens: int = 16) -> decode_pb2.GenerateRequest:
    """A fixed greedy chat request that runs `max_tokens` tokens whatever the model says."""
    messages = decode_pb2.ChatMessages(messages=[decode_pb2.ChatMessage(role=r, content=c) for r, c in STEADY_MESSAGES])
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return decode_pb2.GenerateRequest(messages=messages, sampling=sampling)


def expected_tokens(engine: Engine, request: decode_pb2.GenerateRequest) -> list[int]:
    """What the in-process engine (no cluster, no cache) answers to a greedy chat `request`."""
    messages = [ChatMessage(m.role, m.content) for m in request.messages.messages]
    params = SamplingParams(max_tokens=request.sampling.max_tokens, temperature=0.0, ignore_eos=True)
    return [event.token_id for event in engine.generate(engine.tokenizer.encode_chat(messages), params)]


@contextlib.contextmanager
def fuzz_cluster(store_blocks: int = 256, steady_max_tokens: int = 16) -> Iterator[FuzzCluster]:
    """Redis, a store, prefill and decode, all requiring TOKEN internally; Generate is public."""
    prefill_engine, decode_engine = twin_engines()
    request = steady_request(steady_max_tokens)
    expected = expected_tokens(decode_engine, request)  # before the engine thread owns the engine
    with running_redis() as redis_server:
        store = start_store(redis_server.url, blocks=store_blocks, internal_token=TOKEN)
        prefill, prefill_port = create_prefill(PrefillConfig(
            port=0, metrics_port=-1, redis_url=redis_server.url, internal_token=TOKEN, dtype="float32",
            store_timeout_seconds=10.0), engine=prefill_engine)
        prefill.start()
        decode, decode_port = create_decode(DecodeConfig(
            port=0, metrics_port=-1, redis_url=redis_server.url, prefill_target=f"127.0.0.1:{prefill_port}",
            internal_token=TOKEN, dtype="float32", store_timeout_seconds=10.0, prefill_timeout_seconds=60.0),
            engine=decode_engine)
        decode.start()
        ports = {"decode": decode_port, "prefill": prefill_port, "cache_store": store.port}
        channels = {name: make_channel(f"127.0.0.1:{port}") for name, port in ports.items()}
        try:
            yield FuzzCluster(store, prefill, decode, ports, channels, request, expected)
        finally:
            for channel in channels.values():
                channel.close()
            decode.stop(0.5)
            prefill.stop(0.5)
            store.stop(0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[FuzzCluster]:
    with fuzz_cluster() as running:
        yield running


@pytest.fixture(scope="module")
def steady(cluster: FuzzCluster) -> Iterator["SteadyStream"]:
    """The well-behaved neighbour, running for the whole module; its first round must be exact."""
    with SteadyStream(cluster.generate, cluster.steady_request, cluster.steady_expected) as stream:
        assert stream.wait_for_rounds(1, timeout_s=CALL_TIMEOUT_S), "the steady stream never completed a round"
        assert not stream.failures, stream.report()
        yield stream


# ---- judging one call ------------------------------------------------------------------------

@dataclass
class Outcome:
    """How one fuzzed call ended."""

    code: grpc.StatusCode
    details: str = ""
    responses: int = 0      # messages received (streams) or 1 (unary OK)
    stopped_early: bool = False  # we cancelled a healthy stream after enough messages
    response: object = None      # a unary call's answer


def finish_stream(call, max_messages: int, check: Callable | None = None) -> Outcome:
    """Read a server stream; after `max_messages` a still healthy stream is cancelled (bounded cost)."""
    count = 0
    try:
        for message in call:
            if check is not None:
                check(message)
            count += 1
            if count >= max_messages:
                call.cancel()
                return Outcome(grpc.StatusCode.OK, responses=count, stopped_early=True)
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "", count)
    return Outcome(grpc.StatusCode.OK, responses=count)


def finish_unary(call: Callable[[], object]) -> Outcome:
    try:
        response = call()
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "")
    return Outcome(grpc.StatusCode.OK, responses=1, response=response)


def field_names(descriptor, seen=None) -> set[str]:
    """Every field and oneof name reachable from a message type (the vocabulary of 'a field')."""
    seen = set() if seen is None else seen
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    names = {f.name for f in descriptor.fields} | {o.name for o in descriptor.oneofs}
    for f in descriptor.fields:
        if f.message_type is not None:
            names |= field_names(f.message_type, seen)
    return names


def named_field(details: str, descriptor) -> str | None:
    """The field path an error message opens with ("sampling.top_p: ..."), if every part of it is a
    field of the request; None when the message names no field."""
    head = details.split(":", 1)[0] if ":" in details else ""
    parts = [re.sub(r"\[\d+\]$", "", part) for part in head.split(".")]
    vocabulary = field_names(descriptor)
    return head if parts and all(part in vocabulary for part in parts) else None


def problem_with(outcome: Outcome, descriptor, authenticated: bool = True) -> str | None:
    """Why `outcome` breaks the contract, or None when it is one of the allowed answers."""
    code = outcome.code
    if code == grpc.StatusCode.UNAUTHENTICATED and not authenticated:
        return None
    if not authenticated and code != grpc.StatusCode.UNAUTHENTICATED:
        return f"{code.name} without a valid token (expected UNAUTHENTICATED)"
    if code not in ALLOWED:
        return code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT and named_field(outcome.details, descriptor) is None:
        return "INVALID_ARGUMENT naming no field"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not outcome.details:
        return "RESOURCE_EXHAUSTED without details"
    return None


@dataclass
class Offences:
    """Calls that broke the contract, grouped by what went wrong; the smallest requests kept per group."""

    groups: dict[tuple[str, str], list[tuple[int, str]]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    calls: int = 0
    codes: Counter = field(default_factory=Counter)  # every answer's status, to see what the fuzzing reached

    def record(self, problem: str | None, outcome: Outcome, request_text: str, size: int) -> None:
        self.calls += 1
        self.codes[outcome.code.name] += 1
        if problem is None:
            return
        key = (problem, re.sub(r"\b[0-9a-f]{12,}\b|\d+", "N", outcome.details)[:160])
        self.counts[key] += 1
        examples = self.groups.setdefault(key, [])
        examples.append((size, request_text))
        examples.sort(key=lambda example: example[0])
        del examples[3:]

    def report(self) -> str:
        lines = [f"{sum(self.counts.values())} of {self.calls} calls broke the contract (answers: {dict(self.codes)}):"]
        for key, examples in sorted(self.groups.items()):
            problem, details = key
            lines.append(f"- {problem} x{self.counts[key]}: {details!r}, e.g.")
            lines += [f"    {text}" for _, text in examples]
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return bool(self.groups)


# ---- the well-behaved neighbour --------------------------------------------------------------

@dataclass
class SteadyFailure:
    round: int
    what: str
    meanwhile: list[str]  # fuzzed calls in flight while this round ran


class SteadyStream:
    """Sends one fixed greedy Generate in a loop on its own thread and checks every answer exactly.
    Stops by itself after `max_rounds` or `max_seconds`, whichever comes first."""

    def __init__(self, stub: decode_pb2_grpc.DecodeServiceStub, request: decode_pb2.GenerateRequest,
                 expected: list[int], max_rounds: int = 400, max_seconds: float = 600.0):
        self.stub, self.request, self.expected = stub, request, expected
        self.max_rounds, self.max_seconds = max_rounds, max_seconds
        self.rounds = 0
        self.failures: list[SteadyFailure] = []
        self._in_flight: list[str] = []
        self._seen: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="steady-stream", daemon=True)

    def __enter__(self) -> "SteadyStream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(CALL_TIMEOUT_S + 10)

    @contextlib.contextmanager
    def beside(self, label: str) -> Iterator[None]:
        """Marks a fuzzed call as in flight, so a failure of this stream can name its suspects."""
        with self._lock:
            self._in_flight.append(label)
            self._seen.append(label)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight.remove(label)

    def wait_for_rounds(self, count: int, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.rounds < count and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        return self.rounds >= count

    def _loop(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and self.rounds < self.max_rounds and time.monotonic() < deadline:
            with self._lock:
                self._seen = list(self._in_flight)
            what = self._one_round()
            with self._lock:
                suspects = list(dict.fromkeys(self._seen))
            if what is not None:
                self.failures.append(SteadyFailure(self.rounds, what, [s[:240] for s in suspects[:4]]))
            self.rounds += 1

    def _one_round(self) -> str | None:
        tokens, last = [], None
        try:
            for response in self.stub.Generate(self.request, timeout=CALL_TIMEOUT_S):
                tokens.extend(response.token_ids)
                last = response
        except grpc.RpcError as err:
            return f"{err.code().name} {err.details()!r} after {len(tokens)} tokens"
        if tokens != self.expected:
            return f"tokens {tokens} differ from the expected {self.expected}"
        if last is None or last.finish_reason != decode_pb2.FINISH_REASON_LENGTH:
            return f"ended without finish_reason LENGTH: {last}"
        return None

    def report(self, failures: Iterable[SteadyFailure] | None = None) -> str:
        failures = list(self.failures if failures is None else failures)
        lines = [f"the steady stream failed {len(failures)} of {self.rounds} rounds:"]
        lines += [f"- round {f.round}: {f.what}\n    fuzzed calls in flight: {f.meanwhile}" for f in failures[:10]]
        return "\n".join(lines)


def verdict(offences: Offences, steady: SteadyStream, hurt: list[SteadyFailure]) -> str:
    """Everything that went wrong in one test: contract breaches and harm done to the steady stream."""
    return "\n".join(([offences.report()] if offences else []) + ([steady.report(hurt)] if hurt else []))
