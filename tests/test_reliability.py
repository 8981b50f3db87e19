"""Faults, load and shutdown on a real multi-process cluster (loopback only, bounded loops).

Losing the cache may cost speed, never a request or a correct token."""

import random
import signal
import threading
import time
import urllib.request

import grpc
import psutil
import pytest

from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.client import Client
from kvcluster.engine.sampling import SamplingParams
from kvcluster.model.tokenizer import ChatMessage
from tests.store_fixtures import wait_until

SYSTEM = ("You are the help desk of a container terminal. Answer in one sentence. Terminal hours are 6am to 10pm, "
          "gate fees are 40 dollars, reefer plugs cost 25 dollars a day and free storage lasts five days.")
QUESTIONS = [f"Question {i}: what should I know about {topic}?" for i, topic in enumerate(
    ["gate hours", "reefer plugs", "storage fees", "late pickups", "customs holds", "weekend access",
     "hazardous cargo", "empty returns"])]
MAX_TOKENS = 5
# Starts a multi-process cluster with the real model and loads it with hundreds of requests: minutes.
pytestmark = pytest.mark.slow


def messages(i: int) -> list[tuple[str, str]]:
    return [("system", SYSTEM), ("user", QUESTIONS[i % len(QUESTIONS)])]


@pytest.fixture(scope="module")
def cluster():
    """Workers without their local cache tier (KVC_PREFIX_CACHING=0), so requests keep going
    through the store and Redis whose failures these tests inject."""
    with open("/dev/null", "w") as quiet, Cluster(ClusterPorts.any_free(), log_stream=quiet, dtype="float32",
                                                  extra_env={"KVC_PREFIX_CACHING": "0"}) as running:
        yield running


@pytest.fixture(scope="module")
def expected(smollm_engine) -> list[list[int]]:
    """Greedy outputs of the no-cache reference engine, one per question."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [[e.token_id for e in smollm_engine.generate_no_cache(
        smollm_engine.tokenizer.encode_chat([ChatMessage(r, c) for r, c in messages(i)]), params)]
        for i in range(len(QUESTIONS))]


def ask(target: str, i: int, **extra):
    with Client(target, timeout_s=300) as client:
        return client.generate(messages=messages(i), max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, **extra)


def run_concurrently(target: str, count: int, during=None) -> tuple[dict[int, list[int]], list[Exception]]:
    outputs, failures = {}, []

    def one(i: int) -> None:
        try:
            outputs[i] = ask(target, i).token_ids
        except Exception as exc:  # collected: the assertion names them
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join(600)
    return outputs, failures


def metric(cluster: Cluster, child: str, name: str, labels: str = "") -> float:
    port = cluster.children[child].metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def fallbacks(cluster: Cluster) -> float:
    return sum(metric(cluster, c, "kvcluster_fallbacks_total", f'reason="{r}"')
               for c in ("prefill_service", "decode_service")
               for r in ("store_unavailable", "short_pull", "push_failed", "redis_unavailable", "checksum_mismatch"))


def assert_nothing_held(cluster: Cluster) -> None:
    for _ in range(50):  # releases finish on the engine threads right after the streams end
        held = [metric(cluster, c, "kvcluster_worker_kv_blocks_used") for c in ("prefill_service", "decode_service")]
        pins = metric(cluster, "cache_store", "kvcluster_store_pinned_blocks")
        if held == [0, 0] and pins == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"held worker blocks {held}, store pins {pins}")


def in_flight(cluster: Cluster) -> float:
    return (metric(cluster, "decode_service", "kvcluster_requests_running")
            + metric(cluster, "decode_service", "kvcluster_requests_waiting"))


def warm_until_cached(target: str, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cached = ask(target, 0).usage.cached_tokens
        if cached > 0:
            return cached
        time.sleep(0.5)
    return 0


def test_bounded_load_leaves_no_pins_slots_or_memory_growth(cluster, expected):
    target = cluster.decode_target
    assert warm_until_cached(target) > 0
    store = psutil.Process(cluster.children["cache_store"].process.pid)
    start_rss = store.memory_info().rss
    for _ in range(4):
        outputs, failures = run_concurrently(target, 64)
        assert not failures, failures[:3]
        assert all(outputs[i] == expected[i % len(QUESTIONS)] for i in range(64))
    assert_nothing_held(cluster)
    assert store.memory_info().rss <= start_rss * 1.05


def test_clients_cancelling_at_random_points_leak_nothing(cluster):
    rng = random.Random(7)
    target = cluster.decode_target

    def cancel_after(tokens: int, i: int) -> None:
        with Client(target) as client:
            stream = client.stream(messages=messages(i), max_tokens=40, temperature=0.0, ignore_eos=True)
            try:
                for _ in range(tokens):
                    next(stream)
            except (grpc.RpcError, StopIteration):
                pass
            stream.cancel()

    for wave in range(4):  # 100 clients, 25 at a time so all are admitted
        threads = [threading.Thread(target=cancel_after, args=(rng.randrange(0, 8), wave * 25 + i)) for i in range(25)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert_nothing_held(cluster)
    assert metric(cluster, "decode_service", "kvcluster_requests_total", 'outcome="cancelled"') > 0


def test_killing_the_store_under_load_fails_no_request(cluster, expected):
    target = cluster.decode_target
    assert warm_until_cached(target) > 0
    before = fallbacks(cluster)

    def kill_the_store_under_load() -> None:  # once decode has requests in its batch or queue
        assert wait_until(lambda: in_flight(cluster) > 0, timeout_s=60, interval_s=0.02), "no request in flight"
        cluster.kill("cache_store")

    outputs, failures = run_concurrently(target, 32, during=kill_the_store_under_load)
    assert not failures, failures[:3]
    assert all(outputs[i] == expected[i % len(QUESTIONS)] for i in range(32))
    assert ask(target, 1).token_ids == expected[1]  # with the store gone for sure
    assert fallbacks(cluster) > before
    cluster.restart("cache_store")
    assert warm_until_cached(target) > 0  # hits return once the store is back


def test_redis_down_then_back_fails_no_request(cluster, expected):
    target = cluster.decode_target
    cluster.redis.stop()
    outputs, failures = run_concurrently(target, 8)
    assert not failures, failures[:3]
    assert all(outputs[i] == expected[i] for i in range(8))
    assert metric(cluster, "decode_service", "kvcluster_fallbacks_total", 'reason="redis_unavailable"') > 0
    cluster.redis.restart()
    assert warm_until_cached(target, timeout_s=60) > 0  # the store re-registered and re-published


def test_sigterm_during_load_ends_streams_cleanly_and_exits_zero(cluster):
    """Streams far longer than decode's grace period (5 s) are all running when SIGTERM comes: the
    service must end them with a status, not hang or crash, and exit 0."""
    target = cluster.decode_target
    count, max_tokens = 8, 4000  # 32,000 tokens: far more than decode makes in its 5 s of grace
    started = threading.Semaphore(0)
    ended: dict[int, tuple[str, int]] = {}  # stream -> (status, tokens received)

    def long_request(i: int) -> None:
        received, code = 0, "ok"
        try:
            with Client(target) as client:
                for response in client.stream(messages=messages(i), max_tokens=max_tokens, temperature=0.0,
                                              ignore_eos=True):
                    if not received and response.token_ids:
                        started.release()  # this stream has its first tokens
                    received += len(response.token_ids)
        except grpc.RpcError as err:
            code = err.code().name
        ended[i] = (code, received)

    threads = [threading.Thread(target=long_request, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for _ in range(count):  # every stream is producing tokens before the signal
        assert started.acquire(timeout=300), "a stream got no token"
    assert cluster.kill("decode_service", signal.SIGTERM, timeout_s=60) == 0
    for t in threads:
        t.join(60)
    assert len(ended) == count and not any(t.is_alive() for t in threads)
    codes = [code for code, _ in ended.values()]
    assert set(codes) <= {"ok", "CANCELLED", "UNAVAILABLE"}, ended
    assert codes.count("ok") < count, "every stream finished: the shutdown ended none"
    assert all(0 < n < max_tokens for code, n in ended.values() if code != "ok"), ended
    cluster.restart("decode_service")
    assert ask(cluster.decode_target, 2).usage.completion_tokens == MAX_TOKENS
