"""Generate end to end: real Redis, cache store, prefill and decode gRPC servers, the real model.

Every greedy output is compared with the in-process engine recomputing without any cache."""

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from decode_service.config import DecodeConfig
from decode_service.server import create_server as create_decode
from kvcluster.engine.engine import EngineConfig, load_engine
from kvcluster.engine.sampling import SamplingParams
from kvcluster.model.tokenizer import ChatMessage
from kvcluster.proto import common_pb2, decode_pb2, decode_pb2_grpc
from prefill_service.config import PrefillConfig
from prefill_service.server import create_server as create_prefill
from tests.cluster_fixtures import channel_to, running_redis, start_store

MAX_TOKENS = 12
SYSTEM = ("You are a meticulous assistant for a logistics company. Answer questions about shipping, "
          "customs, warehousing and delivery times precisely, in at most two sentences, and say when "
          "you are unsure. Never invent tracking numbers.")


def greedy(max_tokens: int = MAX_TOKENS) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    engine_config = EngineConfig(kv_capacity_bytes=192 << 20, max_prefill_tokens=256)
    with running_redis() as redis_server:
        store = start_store(redis_server.url, blocks=1024)
        prefill, prefill_port = create_prefill(
            PrefillConfig(port=0, metrics_port=-1, redis_url=redis_server.url, store_timeout_seconds=3.0),
            engine=load_engine(device="cpu", dtype="float32", config=engine_config))
        prefill.start()
        registry = CollectorRegistry()
        decode, decode_port = create_decode(
            DecodeConfig(port=0, metrics_port=-1, redis_url=redis_server.url, prefill_target=f"127.0.0.1:{prefill_port}",
                         store_timeout_seconds=3.0, prefill_timeout_seconds=30.0, disaggregation="always"),
            engine=load_engine(device="cpu", dtype="float32", config=engine_config), registry=registry)
        decode.start()
        state = {"redis": redis_server, "store": store, "prefill": prefill, "decode": decode, "registry": registry,
                 "stub": decode_pb2_grpc.DecodeServiceStub(channel_to(decode_port)),
                 "ports": {"decode": decode_port, "prefill": prefill_port}}
        yield state
        decode.stop(0.5)
        state["prefill"].stop(0.5)
        state["store"].stop(0.5)


def run(cluster, **request) -> tuple[list[int], str, decode_pb2.GenerateResponse]:
    ids, text, last = [], "", None
    for response in cluster["stub"].Generate(decode_pb2.GenerateRequest(**request), timeout=180):
        ids.extend(response.token_ids)
        text += response.text
        last = response
    cluster["decode"].generator.flush_pushes()
    cluster["store"].flush_index()
    return ids, text, last


def chat(*turns: tuple[str, str]) -> decode_pb2.ChatMessages:
    return decode_pb2.ChatMessages(messages=[decode_pb2.ChatMessage(role=r, content=c) for r, c in turns])


def reference(smollm_engine, messages: decode_pb2.ChatMessages, max_tokens: int = MAX_TOKENS) -> list[int]:
    ids = smollm_engine.tokenizer.encode_chat([ChatMessage(m.role, m.content) for m in messages.messages])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [e.token_id for e in smollm_engine.generate_no_cache(ids, params)]


def fallbacks(cluster, reason: str) -> float:
    return cluster["registry"].get_sample_value("kvcluster_fallbacks_total", {"reason": reason}) or 0.0


def test_cold_then_warm_are_exact_and_warm_is_cached(cluster, smollm_engine):
    messages = chat(("system", SYSTEM), ("user", "How long does sea freight from Shanghai to Rotterdam take?"))
    expected = reference(smollm_engine, messages)
    cold_ids, cold_text, cold = run(cluster, messages=messages, sampling=greedy())
    assert cold_ids == expected
    assert cold_text == smollm_engine.tokenizer.decode(expected)
    assert cold.finish_reason == decode_pb2.FINISH_REASON_LENGTH
    assert cold.usage.cached_tokens == 0 and cold.usage.bytes_pulled == 0
    assert cold.usage.prompt_tokens == cold.usage.computed_tokens > 16
    assert cold.usage.completion_tokens == MAX_TOKENS and cold.usage.bytes_handoff > 0
    warm_ids, _, warm = run(cluster, messages=messages, sampling=greedy())
    assert warm_ids == expected
    # served from the decode worker's own pool (the first tier): nothing pulled, one token computed
    assert warm.usage.cached_tokens == warm.usage.local_cache_tokens >= warm.usage.prompt_tokens - 16
    assert warm.usage.bytes_pulled == 0 and warm.usage.prefill_tokens == 0
    assert 1 <= warm.usage.computed_tokens == warm.usage.local_computed_tokens <= 16


def test_shared_system_prompt_partial_hit_is_exact(cluster, smollm_engine):
    run(cluster, messages=chat(("system", SYSTEM), ("user", "What documents does customs need for an import?")),
        sampling=greedy(4))
    messages = chat(("system", SYSTEM), ("user", "Can I ship lithium batteries by air, and what labels are required?"))
    ids, _, last = run(cluster, messages=messages, sampling=greedy())
    assert ids == reference(smollm_engine, messages)
    assert 32 <= last.usage.cached_tokens < last.usage.prompt_tokens


def test_third_turn_of_a_chat_is_exact_and_finds_its_history_cached(cluster, smollm_engine):
    turns = [("system", SYSTEM), ("user", "Where is my parcel usually scanned first?")]
    for question in ("And after that?", "How do I complain about a late delivery?"):
        _, answer, previous = run(cluster, messages=chat(*turns), sampling=greedy(24))
        turns += [("assistant", answer), ("user", question)]
    messages = chat(*turns)
    ids, _, last = run(cluster, messages=messages, sampling=greedy())
    assert ids == reference(smollm_engine, messages)
    # Prefill pushes only prompt blocks: a hit past the previous prompt's full blocks means the
    # previous answer's blocks, pushed by decode when it finished, were found.
    assert last.usage.cached_tokens > (previous.usage.prompt_tokens // 16) * 16


def test_prompt_text_and_token_ids_inputs(cluster, smollm_engine):
    text = "The three primary colours are"
    ids, _, _ = run(cluster, prompt=text, sampling=greedy(6))
    expected = [e.token_id for e in smollm_engine.generate_no_cache(
        smollm_engine.tokenizer.encode(text), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))]
    assert ids == expected
    same, _, _ = run(cluster, token_ids=decode_pb2.TokenIds(ids=smollm_engine.tokenizer.encode(text)), sampling=greedy(6))
    assert same == expected


def test_eight_concurrent_clients_equal_sequential(cluster):
    prompts = [f"Write one sentence about the number {n}." for n in range(8)]
    sequential = [run(cluster, prompt=p, sampling=greedy(8))[0] for p in prompts]
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        results[i] = run(cluster, prompt=prompts[i], sampling=greedy(8))[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert [results[i] for i in range(8)] == sequential
    assert cluster["registry"].get_sample_value("kvcluster_batch_size_count") > 0


def test_cancel_mid_stream_leaves_no_slots_or_pins(cluster):
    stream = cluster["stub"].Generate(decode_pb2.GenerateRequest(
        messages=chat(("system", SYSTEM), ("user", "Tell me a long story about a warehouse.")),
        sampling=greedy(200)), timeout=180)
    next(stream)
    next(stream)
    stream.cancel()
    worker = cluster["decode"].worker
    for _ in range(100):  # the abort reaches the engine thread within a step
        if worker.call(lambda eng: eng.blocks.num_used) == 0:
            break
        time.sleep(0.05)
    assert worker.call(lambda eng: (eng.blocks.num_used, eng.has_work())) == (0, False)
    assert cluster["store"].pool.stats().pinned_blocks == 0
    assert cluster["prefill"].worker.call(lambda eng: eng.blocks.num_used) == 0
    assert cluster["registry"].get_sample_value("kvcluster_requests_total", {"outcome": "cancelled"}) >= 1


@pytest.mark.parametrize("request_fields, field", [
    ({}, "input"),
    ({"prompt": ""}, "prompt"),
    ({"token_ids": decode_pb2.TokenIds(ids=[1, 99999])}, "token_ids"),
    ({"messages": chat(("wizard", "hi"))}, "messages[0].role"),
    ({"prompt": "hi", "sampling": common_pb2.SamplingParams(max_tokens=-1)}, "sampling.max_tokens"),
    ({"prompt": "hi", "sampling": common_pb2.SamplingParams(temperature=-0.5)}, "sampling.temperature"),
    ({"prompt": "hi", "sampling": common_pb2.SamplingParams(top_p=0.0)}, "sampling.top_p"),
    ({"prompt": "hi", "sampling": common_pb2.SamplingParams(top_k=-2)}, "sampling.top_k"),
])
def test_bad_input_is_invalid_argument(cluster, request_fields, field):
    with pytest.raises(grpc.RpcError) as err:
        list(cluster["stub"].Generate(decode_pb2.GenerateRequest(**request_fields), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_health_and_reflection_on_every_service(cluster):
    ports = {**cluster["ports"], "cache_store": cluster["store"].port}
    names = {"decode": "kvcluster.v1.DecodeService", "prefill": "kvcluster.v1.PrefillService",
             "cache_store": "kvcluster.v1.CacheStore"}
    for service, port in ports.items():
        channel = channel_to(port)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listing = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        assert names[service] in {s.name for s in listing.list_services_response.service}


def test_client_deadline_reaches_prefill_and_frees_everything(cluster):
    before = fallbacks(cluster, "prefill_unavailable")
    long_prompt = " ".join(f"Line {i}: a pallet of tiles weighs {i + 300} kilograms." for i in range(120))
    with pytest.raises(grpc.RpcError) as err:
        list(cluster["stub"].Generate(decode_pb2.GenerateRequest(prompt=long_prompt, sampling=greedy(4)), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(200):  # the Prefill call carried the 0.5 s deadline, so it failed on its own
        if fallbacks(cluster, "prefill_unavailable") > before:
            break
        time.sleep(0.05)
    assert fallbacks(cluster, "prefill_unavailable") > before
    worker = cluster["decode"].worker
    assert worker.call(lambda eng: (eng.blocks.num_used, eng.has_work())) == (0, False)


def test_store_stopped_output_is_still_exact(cluster, smollm_engine):
    messages = chat(("system", SYSTEM), ("user", "Is weekend delivery available in rural areas?"))
    run(cluster, messages=messages, sampling=greedy(4))  # cache it first
    store = cluster["store"]
    store.stop(0.2, deregister=False)
    try:
        ids, _, last = run_without_flush(cluster, messages=messages, sampling=greedy())
        assert ids == reference(smollm_engine, messages)
        assert last.usage.store_tokens == 0  # nothing from the dead store (the worker's own pool still serves)
    finally:
        cluster["store"] = start_store(cluster["redis"].url, blocks=1024, store_id=store.store_id, port=store.port)


def test_a_handoffs_first_token_reaches_the_client_before_the_prefill_replicas_pushes_end(cluster, smollm_engine):
    """The first token leaves with PrefillStream's first message: while every push of the prefill
    replica is held back, the client already has it; the rest follows once the pushes end, and the
    whole answer is the engine's own (ordering, not timing: a gate holds the pushes)."""
    prefiller = cluster["prefill"].prefiller
    gate, held = threading.Event(), []
    real_push = prefiller.cache.push

    def gated_push(*args, **kwargs):
        held.append(1)
        assert gate.wait(60), "the test never opened the gate"
        return real_push(*args, **kwargs)

    # A question no other test asks (its blocks are new everywhere), and every uncached token handed
    # off: the measured local-prefill threshold would otherwise keep a short remainder here.
    messages = chat(("system", SYSTEM), ("user", "Which documents does a customs broker need for ticket 7341, a "
                                                 "shipment of ceramic tiles from Valencia to Rotterdam declared at "
                                                 "18,000 euros that arrives by sea next Tuesday?"))
    expected = reference(smollm_engine, messages)
    policy = cluster["decode"].generator.source.policy
    fixed, policy.fixed = policy.fixed, 0
    prefiller.cache.push = gated_push
    try:
        stream = cluster["stub"].Generate(decode_pb2.GenerateRequest(messages=messages, sampling=greedy()), timeout=180)
        first = next(stream)
        assert held and not gate.is_set()  # the prefill replica's pushes have not ended, the token is here
        gate.set()
        rest = list(stream)
    finally:
        gate.set()
        prefiller.cache.push = real_push
        policy.fixed = fixed
    ids = list(first.token_ids) + [t for r in rest for t in r.token_ids]
    assert ids == expected
    assert rest[-1].usage.prefill_tokens > 0  # the blocks did come from the hand-off
    assert rest[-1].usage.completion_tokens == MAX_TOKENS


def test_prefill_stopped_decode_prefills_locally(cluster, smollm_engine):
    cluster["prefill"].stop(0.2)
    before = fallbacks(cluster, "prefill_unavailable")
    # Over 1,024 new tokens: past the most the measured local-prefill threshold allows (its ceiling), so
    # decode always tries the stopped prefill first instead of computing a short prompt itself.
    question = " ".join(f"Container {i} leaves port {i % 17} on day {i % 31}." for i in range(120))
    messages = chat(("system", SYSTEM), ("user", f"{question} Which containers leave on day 3?"))
    ids, _, _ = run(cluster, messages=messages, sampling=greedy(4))  # 4: the reference recomputes per token
    assert ids == reference(smollm_engine, messages, max_tokens=4)
    assert fallbacks(cluster, "prefill_unavailable") > before


def run_without_flush(cluster, **request):
    ids, last = [], None
    for response in cluster["stub"].Generate(decode_pb2.GenerateRequest(**request), timeout=180):
        ids.extend(response.token_ids)
        last = response
    return ids, "", last


def test_python_clients_sync_and_async_agree(cluster):
    import asyncio

    from kvcluster.client import AsyncClient, Client

    target = f"127.0.0.1:{cluster['ports']['decode']}"
    with Client(target) as client:
        sync = client.generate(messages=[("user", "Name a colour.")], max_tokens=6, temperature=0.0)

    async def run_async():
        async with AsyncClient(target) as client:
            return await client.generate(messages=[("user", "Name a colour.")], max_tokens=6, temperature=0.0)

    result = asyncio.run(run_async())
    assert sync.token_ids == result.token_ids and len(sync.token_ids) >= 1
    assert sync.text == result.text and sync.finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens == sync.usage.prompt_tokens > 0



def test_streams_over_the_limit_are_resource_exhausted(cluster):
    servicer = cluster["decode"].servicer
    taken = servicer.max_streams - 1  # leave room for exactly one stream
    for _ in range(taken):
        servicer._streams.acquire()
    try:
        held = cluster["stub"].Generate(decode_pb2.GenerateRequest(prompt="Count to fifty:", sampling=greedy(60)), timeout=60)
        next(held)
        with pytest.raises(grpc.RpcError) as err:
            list(cluster["stub"].Generate(decode_pb2.GenerateRequest(prompt="Hi", sampling=greedy(2)), timeout=60))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams" in err.value.details()
        held.cancel()
    finally:
        for _ in range(taken):
            servicer._streams.release()
    assert cluster["registry"].get_sample_value("kvcluster_requests_total", {"outcome": "rejected"}) >= 1

