"""The OpenAI-compatible gateway over a real cluster (Redis, store, prefill, two decode replicas,
the gateway; every one its own process): the official `openai` client, error objects, routing by
cached prefix and load, POST /reset_prefix_cache, and mid-stream failover when a replica is killed."""

import json
import re
import signal
import subprocess
import sys
import threading

import httpx
import jsonschema
import openai
import pytest

from kvcluster.client import Client
from kvcluster.kv.blocks import prefix_hashes
from kvcluster.kv.index import RedisIndex, worker_namespace
from kvcluster.model.files import read_tokenizer_data
from kvcluster.model.tokenizer import ChatMessage, Tokenizer
from tests.cluster_fixtures import gateway_cluster

pytestmark = pytest.mark.slow

API_KEY = "gateway-test-key"
LONG_DOCUMENT = " ".join(f"Note {i}: shelf {i % 9} holds {i * 3} boxes of part {i % 13}." for i in range(30))


@pytest.fixture(scope="module")
def cluster():
    with gateway_cluster(("--api-keys", f"other-key,{API_KEY}")) as running:
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


def prompt_inputs(cluster) -> dict[str, float]:
    """The gateway's Generate calls so far by how it sent the prompt."""
    return {sent_as: metric(cluster, "kvcluster_gateway_prompt_inputs_total", f'input="{sent_as}"')
            for sent_as in ("token_ids", "text")}


def test_every_replica_registers_the_gateways_tokenizer(cluster):
    """Both decode replicas load the gateway's model, so the gateway sends them token ids."""
    index = RedisIndex(cluster.redis_url, worker_namespace("kvc", "decode"))
    members = [m.store_id for m in index.live_stores()]
    published = index.member_fields(members, ("tokenizer_fingerprint",))
    index.close()
    gateway_side = Tokenizer(read_tokenizer_data(cluster.model or None)).fingerprint
    assert len(members) == 2 and [p.get("tokenizer_fingerprint") for p in published] == [gateway_side] * 2


def test_chat_streamed_equals_unstreamed_equals_grpc(cluster, client):
    """The gateway sends its token ids, decode gets messages directly: the same tokens (greedy)."""
    messages = chat("What is the capital of France? Answer in one sentence.")
    before = prompt_inputs(cluster)
    plain = client.chat.completions.create(model=cluster.served_model, messages=messages, max_tokens=12, temperature=0)
    streamed, chunks = stream_text(client.chat.completions.create(
        model=cluster.served_model, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    with Client(cluster.decode_target) as grpc_client:
        direct = grpc_client.generate(messages=[("user", messages[0]["content"])], max_tokens=12, temperature=0.0)
    assert plain.choices[0].message.content == streamed == direct.text and streamed
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (direct.usage.prompt_tokens,
                                                                           len(direct.token_ids))
    after = prompt_inputs(cluster)
    assert (after["token_ids"] - before["token_ids"], after["text"] - before["text"]) == (2, 0)
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-") and plain.model == cluster.served_model
    assert plain.choices[0].finish_reason in ("stop", "length")
    usage = plain.usage
    assert usage.completion_tokens == 12 or plain.choices[0].finish_reason == "stop"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == usage.prompt_tokens  # include_usage
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason


def test_completions_streamed_equals_unstreamed_equals_grpc(cluster, client):
    """The gateway sends its token ids, decode gets the prompt directly: the same tokens (greedy)."""
    prompt = "The three primary colors are"
    before = prompt_inputs(cluster)
    plain = client.completions.create(model=cluster.served_model, prompt=prompt, max_tokens=10, temperature=0)
    streamed, chunks = stream_text(client.completions.create(model=cluster.served_model, prompt=prompt,
                                                             max_tokens=10, temperature=0, stream=True))
    with Client(cluster.decode_target) as grpc_client:
        direct = grpc_client.generate(prompt=prompt, max_tokens=10, temperature=0.0)
    assert plain.choices[0].text == streamed == direct.text and streamed
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (direct.usage.prompt_tokens,
                                                                           len(direct.token_ids))
    after = prompt_inputs(cluster)
    assert (after["token_ids"] - before["token_ids"], after["text"] - before["text"]) == (2, 0)
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
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n"),
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


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 120}}}


def test_logprobs_of_a_warm_request_equal_the_cold_ones_bitwise(cluster, client):
    """Cold (computed by the prefill service, the last token recomputed by decode for its logprobs), then
    warm from the replica's own cache: every logprob and top list identical, for chat and completions."""
    question = f"Logprobs run {cluster.ports.gateway}. {LONG_DOCUMENT}\nWhich part is on shelf 4?"
    kwargs = dict(model=cluster.served_model, messages=chat(question), max_tokens=8, temperature=0, logprobs=True,
                  top_logprobs=5)
    cold = client.chat.completions.create(**kwargs)
    warm = client.chat.completions.create(**kwargs)
    # cold: at most the chat template's shared system block was cached; warm: all but the tail block
    assert cold.usage.prompt_tokens_details.cached_tokens <= 16
    assert warm.usage.kvcluster["local_cache_tokens"] >= warm.usage.prompt_tokens - 16
    cold_lp, warm_lp = cold.choices[0].logprobs.content, warm.choices[0].logprobs.content
    assert len(cold_lp) == cold.usage.completion_tokens and all(len(t.top_logprobs) == 5 for t in cold_lp)
    assert [t.model_dump() for t in cold_lp] == [t.model_dump() for t in warm_lp]
    assert "".join(t.token for t in cold_lp).startswith(cold.choices[0].message.content)
    assert all(t.logprob <= 0 and t.logprob >= t.top_logprobs[-1].logprob for t in cold_lp)
    streamed = client.chat.completions.create(**kwargs, stream=True)
    assert [t.model_dump() for c in streamed if c.choices and c.choices[0].logprobs
            for t in c.choices[0].logprobs.content] == [t.model_dump() for t in cold_lp]
    text = dict(model=cluster.served_model, prompt=question, max_tokens=4, temperature=0, logprobs=3)
    first, again = client.completions.create(**text), client.completions.create(**text)
    assert first.choices[0].logprobs.model_dump() == again.choices[0].logprobs.model_dump()
    assert len(first.choices[0].logprobs.top_logprobs[0]) == 3


def test_json_schema_output_validates_beside_unconstrained_requests(cluster, client):
    """Four concurrent requests through the official client: two held to a JSON Schema give JSON that
    validates, the two unconstrained ones give the tokens they give alone."""
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    free = [dict(messages=chat(f"Tell me about the {thing}."), max_tokens=16, temperature=0.7, seed=5)
            for thing in ("moon", "sea")]
    constrained = [dict(messages=chat(f"Describe {who} as JSON."), max_tokens=48, temperature=0,
                        response_format=schema_format) for who in ("a baker", "a pilot")]
    alone = [client.chat.completions.create(model=cluster.served_model, **kwargs).choices[0].message.content
             for kwargs in free]
    results = [None] * 4

    def run(i: int, kwargs: dict) -> None:
        results[i] = client.chat.completions.create(model=cluster.served_model, **kwargs)

    threads = [threading.Thread(target=run, args=(i, kwargs)) for i, kwargs in enumerate(free + constrained)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [r.choices[0].message.content for r in results[:2]] == alone
    for answer in results[2:]:
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)


def test_n_choices_share_the_prompt_blocks_and_reproduce_with_seed_plus_index(cluster, client):
    messages = chat(f"Choices run {cluster.ports.gateway}. {LONG_DOCUMENT}\nName one shelf.")
    kwargs = dict(model=cluster.served_model, messages=messages, max_tokens=6, temperature=0.9)
    several = client.chat.completions.create(**kwargs, n=3, seed=40)
    assert [c.index for c in several.choices] == [0, 1, 2]
    per_choice = several.usage.kvcluster["choices"]
    assert len({c["replica"] for c in per_choice}) == 1  # one replica holds the prompt for all of them
    assert per_choice[0]["local_cache_tokens"] <= 16  # choice 0 was cold (but for the template's system block)
    assert all(c["local_cache_tokens"] >= several.usage.prompt_tokens - 16 for c in per_choice[1:])
    answers = [client.chat.completions.create(**kwargs, seed=40 + i) for i in range(3)]
    singles = [a.choices[0].message.content for a in answers]
    assert [c.message.content for c in several.choices] == singles
    assert several.usage.completion_tokens == sum(a.usage.completion_tokens for a in answers)
    streamed = {}
    for chunk in client.chat.completions.create(**kwargs, n=3, seed=40, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == singles


def test_penalties_bias_and_min_tokens_reach_the_engine(cluster, client):
    prompt = "Repeat after me: one one one one one one"
    shaped = dict(max_tokens=8, temperature=0.8, seed=3, presence_penalty=1.5, frequency_penalty=0.5,
                  extra_body={"repetition_penalty": 1.3, "min_tokens": 8})
    via_http = client.completions.create(model=cluster.served_model, prompt=prompt, **shaped)
    with Client(cluster.decode_target) as grpc_client:
        direct = grpc_client.generate(prompt=prompt, max_tokens=8, temperature=0.8, seed=3, presence_penalty=1.5,
                                      frequency_penalty=0.5, repetition_penalty=1.3, min_tokens=8)
        plain = grpc_client.generate(prompt=prompt, max_tokens=8, temperature=0.8, seed=3)
    assert via_http.choices[0].text == direct.text and direct.token_ids != plain.token_ids
    assert via_http.usage.completion_tokens == 8
    tokenizer = Tokenizer(read_tokenizer_data())
    forced = tokenizer.encode(" banana")[0]
    biased = client.completions.create(model=cluster.served_model, prompt=prompt, max_tokens=3, temperature=0,
                                       logit_bias={str(forced): 100})
    assert biased.choices[0].text == tokenizer.decode([forced] * 3)


CHAT = [{"role": "user", "content": "hi"}]
HOSTILE = [  # (body fields, the param the 400 names)
    ({"logprobs": "yes"}, "logprobs"), ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": "high"}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias.5"), ({"logit_bias": {str(i): 1 for i in range(5000)}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"), ({"n": 0}, "n"), ({"n": 1000}, "n"), ({"n": "2"}, "n"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"), ({"audio": {"voice": "alloy"}}, "audio"),
    ({"store": True}, "store"), ({"no_such_field": 1}, "no_such_field"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
]


def test_hostile_fields_get_400_naming_them_while_a_normal_request_completes(cluster, client):
    kwargs = dict(model=cluster.served_model, messages=chat("Name a color."), max_tokens=10, temperature=0)
    expected = client.chat.completions.create(**kwargs).choices[0].message.content
    normal = {}
    thread = threading.Thread(target=lambda: normal.update(text=stream_text(
        client.chat.completions.create(**kwargs, stream=True))[0]))
    thread.start()
    for fields, param in HOSTILE:
        body = {"model": cluster.served_model, "messages": CHAT, **fields}
        response = httpx.post(f"{cluster.gateway_url}/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 400, (fields, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["message"].startswith(param), (fields, error)
    for fields, param in [({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "end"}, "suffix"),
                          ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [[1], [2]]}, "prompt"),
                          ({"prompt": [1, 10 ** 7]}, "prompt"), ({"logprobs": 21}, "logprobs")]:
        body = {"model": cluster.served_model, "prompt": "hi", **fields}
        response = httpx.post(f"{cluster.gateway_url}/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (fields, response.text)
    thread.join(120)
    assert normal["text"] == expected


def test_tokenize_and_detokenize(cluster, client):
    url, headers = cluster.gateway_url, {"Authorization": f"Bearer {API_KEY}"}
    messages = chat("How many shelves are there?")
    counted = httpx.post(f"{url}/tokenize", json={"model": cluster.served_model, "messages": messages,
                                                   "return_token_strs": True}, headers=headers, timeout=30).json()
    answer = client.chat.completions.create(model=cluster.served_model, messages=messages, max_tokens=1)
    assert counted["count"] == len(counted["tokens"]) == answer.usage.prompt_tokens
    assert counted["max_model_len"] == 8192 and len(counted["token_strs"]) == counted["count"]
    text = httpx.post(f"{url}/detokenize", json={"tokens": counted["tokens"]}, headers=headers, timeout=30).json()
    assert text["prompt"] == "".join(counted["token_strs"]) and "How many shelves" in text["prompt"]
    plain = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world"}, headers=headers, timeout=30).json()
    assert plain["tokens"] == Tokenizer(read_tokenizer_data()).encode("Hello world") and plain["token_strs"] is None
    for path, body, param in [("/detokenize", {"tokens": [1, 10 ** 6]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens"),
                              ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
                              ("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"model": "other", "prompt": "a"}, "model")]:
        response = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=30)
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == param, response.text
    assert httpx.post(f"{url}/tokenize", json={"prompt": "a"}, timeout=30).status_code == 401


def test_stream_survives_its_replica_being_killed(cluster, client):
    """Several concurrent streams (greedy and seeded sampling); one replica is SIGKILLed once they are
    under way: every stream still completes, token for token what an undisturbed run gives."""
    prompts = [f"Write a long, detailed story about a {animal} who learns to {skill}."
               for animal, skill in (("fox", "sail"), ("bear", "paint"), ("owl", "cook"), ("cat", "fly"))]
    samplings = [dict(temperature=0), dict(temperature=0), dict(temperature=0, frequency_penalty=1.0),
                 dict(temperature=0.8, seed=7, presence_penalty=1.5)]  # penalties count the resumed tokens
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


def test_the_gateway_builds_without_importing_torch():
    """The gateway is an HTTP front: it reads the model's config and tokenizer (kvcluster.model.files) and
    tokenizes, but never loads torch (half a gigabyte of memory and seconds of start-up per process)."""
    code = ("import sys\n"
            "from gateway.config import GatewayConfig\n"
            "from gateway.server import Gateway\n"
            "gateway = Gateway(GatewayConfig(redis_url=''))\n"
            "assert gateway.tokenizer.encode('Hello there') and gateway.limits.max_tokens > 0\n"
            "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
