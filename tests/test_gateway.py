"""The OpenAI-compatible gateway over a real cluster (Redis, store, prefill, two decode replicas,
the gateway; every one its own process): the official `openai` client, error objects, routing by
cached prefix and load, POST /reset_prefix_cache, and mid-stream failover when a replica is killed."""

import json
import re
import signal
import threading

import httpx
import openai
import pytest

from kvcluster.blocks import prefix_hashes
from kvcluster.client import Client
from kvcluster.index import RedisIndex, worker_namespace
from kvcluster.launcher import Cluster, ClusterPorts
from kvcluster.model.loader import read_tokenizer_data
from kvcluster.model.tokenizer import ChatMessage, Tokenizer

pytestmark = pytest.mark.slow

API_KEY = "gateway-test-key"
LONG_DOCUMENT = " ".join(f"Note {i}: shelf {i % 9} holds {i * 3} boxes of part {i % 13}." for i in range(30))


@pytest.fixture(scope="module")
def cluster():
    with open("/dev/null", "w") as quiet, Cluster(
            ClusterPorts.any_free(), dtype="float32", decode_replicas=2, gateway=True, log_stream=quiet,
            gateway_args=("--api-keys", f"other-key,{API_KEY}"),
            extra_env={"KVC_KV_CAPACITY_BYTES": str(192 << 20), "KVC_REGISTRY_HEARTBEAT_SECONDS": "0.5"}) as running:
        yield running


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(messages_text: str) -> list[dict]:
    return [{"role": "user", "content": messages_text}]


def stream_text(stream) -> tuple[str, list]:
    text, chunks = [], []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices:
            choice = chunk.choices[0]
            text.append(choice.delta.content or "" if hasattr(choice, "delta") else choice.text)
    return "".join(text), chunks


def test_chat_streamed_equals_unstreamed_equals_grpc(cluster, client):
    messages = chat("What is the capital of France? Answer in one sentence.")
    plain = client.chat.completions.create(model=cluster.served_model, messages=messages, max_tokens=12, temperature=0)
    streamed, chunks = stream_text(client.chat.completions.create(
        model=cluster.served_model, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    with Client(cluster.decode_target) as grpc_client:
        direct = grpc_client.generate(messages=[("user", messages[0]["content"])], max_tokens=12, temperature=0.0)
    assert plain.choices[0].message.content == streamed == direct.text and streamed
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-") and plain.model == cluster.served_model
    assert plain.choices[0].finish_reason in ("stop", "length")
    usage = plain.usage
    assert usage.completion_tokens == 12 or plain.choices[0].finish_reason == "stop"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == usage.prompt_tokens  # include_usage
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason


def test_completions_streamed_equals_unstreamed_equals_grpc(cluster, client):
    prompt = "The three primary colors are"
    plain = client.completions.create(model=cluster.served_model, prompt=prompt, max_tokens=10, temperature=0)
    streamed, chunks = stream_text(client.completions.create(model=cluster.served_model, prompt=prompt,
                                                             max_tokens=10, temperature=0, stream=True))
    with Client(cluster.decode_target) as grpc_client:
        direct = grpc_client.generate(prompt=prompt, max_tokens=10, temperature=0.0)
    assert plain.choices[0].text == streamed == direct.text and streamed
    assert plain.object == "text_completion" and chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_sampled_request_is_reproducible_with_its_seed(cluster, client):
    kwargs = dict(model=cluster.served_model, messages=chat("Name a fruit."), max_tokens=8, temperature=0.9, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second, _ = stream_text(client.chat.completions.create(**kwargs, stream=True))
    assert first == second


def test_warm_repeat_goes_to_the_replica_holding_it_and_reports_cached_tokens(cluster, client):
    messages = chat(f"{LONG_DOCUMENT}\nWhich shelf holds part 5?")
    before = metric(cluster, "kvcluster_gateway_routing_decisions_total", 'reason="cache_hit"')
    cold = client.chat.completions.create(model=cluster.served_model, messages=messages, max_tokens=4, temperature=0)
    for _ in range(3):  # every repeat finds the whole prompt on the replica that served it
        warm = client.chat.completions.create(model=cluster.served_model, messages=messages, max_tokens=4, temperature=0)
        assert warm.usage.kvcluster["replica"] == cold.usage.kvcluster["replica"]
        assert warm.usage.prompt_tokens_details.cached_tokens >= warm.usage.prompt_tokens - 16
        assert warm.usage.kvcluster["local_cache_tokens"] > 0
        assert warm.choices[0].message.content == cold.choices[0].message.content
    assert metric(cluster, "kvcluster_gateway_routing_decisions_total", 'reason="cache_hit"') >= before + 3


def test_new_prompt_goes_to_the_less_loaded_replica(cluster, client):
    busy = httpx.Client(timeout=120)
    body = {"model": cluster.served_model, "prompt": "Once upon a time, in a faraway kingdom,", "max_tokens": 40,
            "temperature": 0, "stream": True}
    with busy.stream("POST", f"{cluster.gateway_url}/v1/completions", json=body,
                     headers={"Authorization": f"Bearer {API_KEY}"}) as held:
        busy_replica = held.headers["x-kvcluster-replica"]
        lines = held.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # it is generating now
        other = client.completions.create(model=cluster.served_model, prompt="Zebras and giraffes live in",
                                          max_tokens=2, temperature=0)
        assert other.usage.kvcluster["replica"] != busy_replica
        for _ in lines:
            pass
    busy.close()


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, "body"),
    ({"model": "M"}, 400, "messages"),
    ({"model": "M", "messages": "hi"}, 400, "messages"),
    ({"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}, 400, "stop"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": 1}, 400, "ignore_eos"),
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ([1, 2, 3], 400, "body"),
])
def test_bad_requests_get_the_openai_error_object(cluster, body, status, param):
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": cluster.served_model}
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{cluster.gateway_url}/v1/chat/completions", content=content, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    if param in ("max_tokens", "max_completion_tokens"):
        assert re.search(r"\[1, \d+\]", error["message"])  # names the limit


def test_replica_invalid_argument_becomes_400_with_its_message(cluster):
    body = {"model": cluster.served_model, "prompt": "word " * 9000, "max_tokens": 4}
    response = httpx.post(f"{cluster.gateway_url}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and "the limit is" in error["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_missing_or_wrong_key_is_401(cluster, headers):
    body = {"model": cluster.served_model, "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(f"{cluster.gateway_url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_models_health_and_metrics(cluster, client):
    assert [model.id for model in client.models.list()] == [cluster.served_model]
    health = httpx.get(f"{cluster.gateway_url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["replicas_up"] == 2
    assert health.json()["numerics"] == {"batch-invariant": 2} and health.json()["exactness_guaranteed"] is True
    text = httpx.get(f"{cluster.gateway_url}/metrics", timeout=10).text
    assert 'kvcluster_gateway_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'kvcluster_gateway_requests_total{route="/v1/chat/completions",status="401"}' in text
    assert "kvcluster_gateway_time_to_first_token_seconds_bucket" in text
    assert re.search(r'kvcluster_gateway_routing_decisions_total\{reason="least_loaded"\} [1-9]', text)
    assert "kvcluster_gateway_replicas_up 2.0" in text


def test_reset_prefix_cache_empties_every_replica_and_the_routers_view(cluster, client):
    """Warm from the serving replica's own pool; the reset (API key required) drops every replica's
    local cache and its registry entries, so the router credits nobody; the next identical request
    finds nothing locally, pulls what the cache store (not reset) still holds, and answers the same."""
    question = f"{LONG_DOCUMENT}\nHow many boxes of part 7 are there?"
    kwargs = dict(model=cluster.served_model, messages=chat(question), max_tokens=6, temperature=0,
                  extra_body={"ignore_eos": True})
    cold = client.chat.completions.create(**kwargs)
    assert cold.usage.completion_tokens == 6 and cold.choices[0].finish_reason == "length"  # ignore_eos reaches decode
    warm = client.chat.completions.create(**kwargs)
    assert warm.usage.kvcluster["local_cache_tokens"] >= warm.usage.prompt_tokens - 16
    index = RedisIndex(cluster.redis_url, worker_namespace("kvc", "decode"))
    try:
        members = index.live_stores()
        prompt = Tokenizer(read_tokenizer_data()).encode_chat([ChatMessage("user", question)])
        hashes = prefix_hashes(bytes.fromhex(members[0].fingerprint), prompt, 16)
        held = dict(zip([m.store_id for m in members], index.held_prefix(hashes, members)))
        assert held[warm.usage.kvcluster["replica"]] == len(prompt) // 16  # what the router credits it with

        url = f"{cluster.gateway_url}/reset_prefix_cache"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = httpx.post(url, headers=headers, timeout=30)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        reset = httpx.post(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert reset.status_code == 200, reset.text
        body = reset.json()
        assert body["reset"] is True and body["replicas"] == 2 and body["index_updated"] is True
        assert body["blocks_dropped"] >= len(prompt) // 16 and sorted(body["per_replica"]) == sorted(held)
        assert index.held_prefix(hashes, members) == [0, 0]
    finally:
        index.close()

    hits = metric(cluster, "kvcluster_gateway_routing_decisions_total", 'reason="cache_hit"')
    again = client.chat.completions.create(**kwargs)
    assert metric(cluster, "kvcluster_gateway_routing_decisions_total", 'reason="cache_hit"') == hits
    sources = again.usage.kvcluster
    assert sources["local_cache_tokens"] == 0
    assert sources["store_tokens"] > 0 and again.usage.prompt_tokens_details.cached_tokens == sources["store_tokens"]
    assert sources["store_tokens"] + sources["prefill_tokens"] + sources["local_computed_tokens"] == again.usage.prompt_tokens
    assert again.choices[0].message.content == warm.choices[0].message.content == cold.choices[0].message.content


def test_decode_resumes_after_handed_over_tokens(cluster):
    with Client(cluster.decode_target) as grpc_client:
        request = dict(prompt="List the planets of the solar system:", max_tokens=16, temperature=0.7, seed=99,
                       ignore_eos=True)
        tokens = grpc_client.generate(**request).token_ids
        resumed = grpc_client.generate(**request, resume_token_ids=tokens[:5])
    assert list(resumed.token_ids) == tokens[5:]
    assert resumed.usage.completion_tokens == len(tokens) == 16


def test_stream_survives_its_replica_being_killed(cluster, client):
    """Several concurrent streams (greedy and seeded sampling); one replica is SIGKILLed once they are
    under way: every stream still completes, token for token what an undisturbed run gives."""
    prompts = [f"Write a long, detailed story about a {animal} who learns to {skill}."
               for animal, skill in (("fox", "sail"), ("bear", "paint"), ("owl", "cook"), ("cat", "fly"))]
    samplings = [dict(temperature=0), dict(temperature=0), dict(temperature=0), dict(temperature=0.8, seed=7)]
    max_tokens = 48
    expected = []
    for prompt, sampling in zip(prompts, samplings):
        reference = client.chat.completions.create(model=cluster.served_model, messages=chat(prompt),
                                                   max_tokens=max_tokens, **sampling)
        assert reference.choices[0].finish_reason == "length"  # still streaming when the kill comes
        expected.append(reference.choices[0].message.content)
    before = metric(cluster, "kvcluster_gateway_failovers_total", 'when="mid_stream"')
    results, started, replicas = [None] * 4, [threading.Event() for _ in prompts], [None] * 4

    def run(i: int) -> None:
        body = {"model": cluster.served_model, "messages": chat(prompts[i]), "max_tokens": max_tokens, "stream": True,
                **samplings[i]}
        text, count = [], 0
        with httpx.stream("POST", f"{cluster.gateway_url}/v1/chat/completions", json=body, timeout=180,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            replicas[i] = response.headers["x-kvcluster-replica"]
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text.append(chunk["choices"][0]["delta"].get("content") or "")
                count += 1
                if count == 4:
                    started[i].set()
        results[i] = "".join(text)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for event in started:
        assert event.wait(120)
    victim = next(name for name, child in cluster.children.items()
                  if name.startswith("decode_service") and str(child.grpc_port) == replicas[0].rsplit("-", 1)[1])
    cluster.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.join(180)
    assert results == expected
    assert metric(cluster, "kvcluster_gateway_failovers_total", 'when="mid_stream"') >= before + 1


def metric(cluster, name: str, labels: str) -> float:
    text = httpx.get(f"{cluster.gateway_url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0
