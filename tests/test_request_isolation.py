"""One bad request never hurts another (issue 13): requests built to break the engine, sent beside
a normal one.

The bad requests are well formed and their numbers pass today's range checks, but they break the
sampling math (a temperature so small that logits / temperature overflows float32 to inf, and
softmax of inf is NaN) or the engine's bookkeeping (two requests under one request id). Each
is sent while a normal greedy stream is running in the same engine: the normal stream must
complete with exactly the tokens the in-process engine computed up front, and the bad request
must get INVALID_ARGUMENT naming its field (not INTERNAL, not a hang).
"""

import threading

import grpc
import pytest

from kvcluster.engine.sampling import SamplingParams
from kvcluster.errors import ResourceExhausted
from kvcluster.proto import common_pb2, decode_pb2, prefill_pb2
from tests.fuzz_cluster import CALL_TIMEOUT_S, WITH_TOKEN, fuzz_cluster

pytestmark = pytest.mark.slow

NORMAL_TOKENS = 64
LONG_PROMPT = ("A lighthouse keeper climbs the stairs at dusk, trims the wick, winds the clockwork that turns the "
               "lens, logs the weather every four hours and watches the sea for ships in trouble. ")


def sampling(**fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**fields)


# name -> (request, the field its error must name). Short prompts are prefilled by decode itself;
# long ones (over one block uncached) go through the prefill service first.
BAD_GENERATES = {
    "smallest subnormal temperature": (
        decode_pb2.GenerateRequest(prompt="Hi", sampling=sampling(temperature=1e-45, max_tokens=4)), "sampling.temperature"),
    "subnormal temperature, long prompt via prefill": (
        decode_pb2.GenerateRequest(prompt=LONG_PROMPT, sampling=sampling(temperature=1e-40, max_tokens=4)),
        "sampling.temperature"),
    "smallest normal temperature": (
        decode_pb2.GenerateRequest(prompt="Hi", sampling=sampling(temperature=1.1754944e-38, max_tokens=4)),
        "sampling.temperature"),
    "temperature 1e-37, a normal float32 (the logits of token 793 reach past 34)": (
        decode_pb2.GenerateRequest(token_ids=decode_pb2.TokenIds(ids=[793]), sampling=sampling(temperature=1e-37)),
        "sampling.temperature"),
    "tiny temperature with top_k 1": (
        decode_pb2.GenerateRequest(prompt="Hi", sampling=sampling(temperature=1e-42, top_k=1, max_tokens=4)),
        "sampling.temperature"),
    "tiny temperature with a subnormal top_p, seeded, no cache": (
        decode_pb2.GenerateRequest(prompt="Hi there", bypass_cache=True, sampling=sampling(
            temperature=1e-44, top_p=1e-45, seed=2**64 - 1, max_tokens=4)), "sampling.temperature"),
}


@pytest.fixture(scope="module")
def cluster():
    with fuzz_cluster(steady_max_tokens=NORMAL_TOKENS) as running:
        yield running


class NormalStream:
    """The normal request, streamed on its own thread; `started` is set at its first token."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.tokens: list[int] = []
        self.last = None
        self.error: grpc.RpcError | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for response in self.cluster.generate.Generate(self.cluster.steady_request, timeout=CALL_TIMEOUT_S):
                self.tokens.extend(response.token_ids)
                self.last = response
                self.started.set()
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.started.set()

    def __enter__(self) -> "NormalStream":
        self.thread.start()
        assert self.started.wait(CALL_TIMEOUT_S)
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(CALL_TIMEOUT_S)

    def harm(self) -> str | None:
        """What went wrong with the normal stream, or None when it got exactly its expected tokens."""
        if self.error is not None:
            return f"{self.error.code().name} {self.error.details()!r} after {len(self.tokens)} tokens"
        if self.tokens != self.cluster.steady_expected:
            return f"tokens {self.tokens} instead of {self.cluster.steady_expected}"
        if self.last.finish_reason != decode_pb2.FINISH_REASON_LENGTH:
            return f"finish reason {self.last.finish_reason} instead of LENGTH"
        return None


def rpc_error(call) -> grpc.RpcError | None:
    try:
        call()
    except grpc.RpcError as err:
        return err
    return None


def status_of(error: grpc.RpcError | None) -> str:
    return "OK" if error is None else f"{error.code().name} {error.details()!r}"


def test_the_normal_stream_alone_is_exact(cluster):
    with NormalStream(cluster) as normal:
        pass
    assert normal.harm() is None, normal.harm()
    assert len(cluster.steady_expected) == NORMAL_TOKENS


@pytest.mark.parametrize("case", list(BAD_GENERATES))
def test_a_generate_that_breaks_the_sampling_math_hurts_no_one(cluster, case):
    request, field = BAD_GENERATES[case]
    with NormalStream(cluster) as normal:
        bad = rpc_error(lambda: list(cluster.generate.Generate(request, timeout=CALL_TIMEOUT_S)))
    harm = normal.harm()
    assert harm is None, f"the normal stream was hurt: {harm}; the bad request got {status_of(bad)}"
    assert bad is not None and bad.code() == grpc.StatusCode.INVALID_ARGUMENT, status_of(bad)
    assert bad.details().startswith(field), status_of(bad)


def test_a_prefill_that_breaks_the_sampling_math_hurts_no_one_beside_it(cluster):
    """A good Prefill long enough to take several prefill steps, and a bad one sent meanwhile:
    the good one keeps its first token."""
    engine = cluster.decode.generator.worker.engine
    prompt = engine.tokenizer.encode(LONG_PROMPT * 25)[:1200]  # three chunks of at most 512 tokens
    expected_first = first_token(cluster, prompt)
    good = prefill_pb2.PrefillRequest(request_id="good", token_ids=prompt, sampling=sampling(temperature=0.0),
                                      bypass_cache=True)
    bad = prefill_pb2.PrefillRequest(request_id="bad", token_ids=prompt[:40], sampling=sampling(temperature=1e-45),
                                     bypass_cache=True)
    stub = cluster.prefill_stub
    good_future = stub.Prefill.future(good, timeout=CALL_TIMEOUT_S, metadata=WITH_TOKEN)
    bad_error = rpc_error(lambda: stub.Prefill(bad, timeout=CALL_TIMEOUT_S, metadata=WITH_TOKEN))
    good_error = rpc_error(good_future.result)
    assert good_error is None, f"the good Prefill was hurt: {status_of(good_error)}; the bad one got {status_of(bad_error)}"
    assert good_future.result().first_token_id == expected_first
    assert bad_error is not None and bad_error.code() == grpc.StatusCode.INVALID_ARGUMENT, status_of(bad_error)
    assert bad_error.details().startswith("sampling.temperature"), status_of(bad_error)


def first_token(cluster, prompt: list[int]) -> int:
    """The greedy first token of `prompt`, computed by the prefill engine on its own thread."""
    params = SamplingParams(max_tokens=1, temperature=0.0)
    return cluster.prefill.prefiller.worker.call(
        lambda engine: next(engine.generate_no_cache(prompt, params)).token_id, timeout=CALL_TIMEOUT_S)


class _RecordingSubscribers(dict):
    """Spy on EngineWorker._subscribers (request id -> the queue feeding that request's stream): it
    remembers every queue, so the test can end a stream that lost its queue to another request;
    else that Prefill handler thread would wait forever and keep the interpreter from exiting."""

    def __init__(self, *args):
        super().__init__(*args)
        self.every_queue = []

    def __setitem__(self, key, value):
        self.every_queue.append(value)
        super().__setitem__(key, value)

    def end_every_stream(self) -> None:
        for queue in self.every_queue:
            queue.put(ResourceExhausted("ended by the test"))  # a finished stream never reads it


def spy_on_subscribers(worker) -> _RecordingSubscribers:
    spy = _RecordingSubscribers()

    def install(_engine) -> None:
        if isinstance(getattr(worker, "_subscribers", None), dict):  # the worker as it is today
            spy.update(worker._subscribers)
            worker._subscribers = spy
    worker.call(install)
    return spy


def test_two_prefills_under_one_request_id_both_get_their_own_answer(cluster):
    """A request id is the caller's label, not a key another caller can take over."""
    engine = cluster.decode.generator.worker.engine
    long_prompt = engine.tokenizer.encode(LONG_PROMPT * 25)[:1200]  # still being prefilled when the second arrives
    short_prompt = engine.tokenizer.encode("The capital of France is")
    expected = [first_token(cluster, long_prompt), first_token(cluster, short_prompt)]
    assert expected[0] != expected[1]  # so an answer handed to the wrong caller shows
    spy = spy_on_subscribers(cluster.prefill.prefiller.worker)
    try:
        futures = []
        for prompt in (long_prompt, short_prompt):
            request = prefill_pb2.PrefillRequest(request_id="same-id", token_ids=prompt,
                                                 sampling=sampling(temperature=0.0), bypass_cache=True)
            futures.append(cluster.prefill_stub.Prefill.future(request, timeout=30, metadata=WITH_TOKEN))
        answers = [_first_token_or_status(future) for future in futures]
    finally:
        spy.end_every_stream()
    # The first caller keeps its answer; the second gets its own, or is refused naming the field.
    assert answers[0] == expected[0] and answers[1] in (expected[1], "INVALID_ARGUMENT request_id"), (
        f"expected first tokens {expected}, got {answers}")


def _first_token_or_status(future) -> int | str:
    error = rpc_error(future.result)
    if error is None:
        return future.result().first_token_id
    named = " request_id" if error.details().startswith("request_id") else ""
    return f"{error.code().name}{named}"
