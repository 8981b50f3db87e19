"""A locked-down cluster (TLS everywhere, mutual TLS and a shared token inside, an API key on
Generate) facing hostile input: every bad request gets the right status code and a message naming
the field, and every service is still SERVING afterwards."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cache_store.config import StoreConfig
from cache_store.server import create_server as create_store
from decode_service.config import DecodeConfig
from decode_service.server import create_server as create_decode
from kvcluster.client import Client
from kvcluster.engine.engine import EngineConfig, load_engine
from kvcluster.proto import cache_pb2, cache_pb2_grpc, common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from kvcluster.rpc.plumbing import make_channel
from kvcluster.rpc.security import API_KEY_HEADER, INTERNAL_TOKEN_HEADER
from prefill_service.config import PrefillConfig
from prefill_service.server import create_server as create_prefill
from tests.cluster_fixtures import SMOLLM_BLOCK_BYTES, running_redis
from tests.tls_certs import make_certs

API_KEY = "test-api-key"
TOKEN = "internal-secret"
BAD = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    inside = dict(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca, tls_ca=certs.ca,
                  tls_client_cert=certs.client_cert, tls_client_key=certs.client_key, internal_token=TOKEN)
    engine_config = EngineConfig(kv_capacity_bytes=96 << 20)
    with running_redis() as redis_server:
        store, store_port = create_store(StoreConfig(port=0, metrics_port=-1, redis_url=redis_server.url,
                                                     capacity_bytes=256 * SMOLLM_BLOCK_BYTES, heartbeat_seconds=0.5,
                                                     grace_seconds=0.5, dtype="float32", **inside))
        store.start()
        prefill, prefill_port = create_prefill(PrefillConfig(port=0, metrics_port=-1, redis_url=redis_server.url, **inside),
                                               engine=load_engine(device="cpu", dtype="float32", config=engine_config))
        prefill.start()
        public = {**inside, "tls_client_ca": ""}  # Generate is public: TLS, API key, no client certificate
        decode, decode_port = create_decode(DecodeConfig(port=0, metrics_port=-1, redis_url=redis_server.url,
                                                         prefill_target=f"127.0.0.1:{prefill_port}", api_key=API_KEY,
                                                         **public),
                                            engine=load_engine(device="cpu", dtype="float32", config=engine_config))
        decode.start()
        tls = grpc.ssl_channel_credentials(open(certs.ca, "rb").read())
        mtls = grpc.ssl_channel_credentials(open(certs.ca, "rb").read(), open(certs.client_key, "rb").read(),
                                            open(certs.client_cert, "rb").read())
        yield {"certs": certs, "tls": tls, "mtls": mtls, "store": store,
               "ports": {"decode": decode_port, "prefill": prefill_port, "cache_store": store_port}}
        decode.stop(0.5)
        prefill.stop(0.5)
        store.stop(0.5)


def channel(secure, service: str, credentials=None) -> grpc.Channel:
    creds = credentials if credentials is not None else (secure["tls"] if service == "decode" else secure["mtls"])
    return make_channel(f"127.0.0.1:{secure['ports'][service]}", credentials=creds)


def generate(secure, request: decode_pb2.GenerateRequest, metadata=((API_KEY_HEADER, f"Bearer {API_KEY}"),)):
    stub = decode_pb2_grpc.DecodeServiceStub(channel(secure, "decode"))
    return list(stub.Generate(request, timeout=60, metadata=metadata))


def raw_generate(secure, payload: bytes):
    call = channel(secure, "decode").unary_stream("/kvcluster.v1.DecodeService/Generate",
                                                  request_serializer=lambda raw: raw,
                                                  response_deserializer=decode_pb2.GenerateResponse.FromString)
    return list(call(payload, timeout=60, metadata=((API_KEY_HEADER, f"Bearer {API_KEY}"),)))


def sampling(**fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**fields)


def chat(*pairs) -> decode_pb2.ChatMessages:
    return decode_pb2.ChatMessages(messages=[decode_pb2.ChatMessage(role=r, content=c) for r, c in pairs])


GENERATE_CASES = {
    "no input": (decode_pb2.GenerateRequest(), "input"),
    "empty prompt": (decode_pb2.GenerateRequest(prompt=""), "prompt"),
    "prompt over the context": (decode_pb2.GenerateRequest(prompt=" token" * 9000), "prompt"),
    "empty chat": (decode_pb2.GenerateRequest(messages=chat()), "messages"),
    "unknown chat role": (decode_pb2.GenerateRequest(messages=chat(("user", "hi"), ("robot", "x"))), "messages[1].role"),
    "token id out of range": (decode_pb2.GenerateRequest(token_ids=decode_pb2.TokenIds(ids=[5, 49152])), "token_ids"),
    "no token ids": (decode_pb2.GenerateRequest(token_ids=decode_pb2.TokenIds()), "token_ids"),
    "negative max_tokens": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=-5)), "sampling.max_tokens"),
    "zero max_tokens": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=0)), "sampling.max_tokens"),
    "huge max_tokens": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=2_000_000)), "sampling.max_tokens"),
    "negative temperature": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(temperature=-0.1)), "sampling.temperature"),
    "NaN temperature": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(temperature=float("nan"))), "sampling.temperature"),
    "top_p zero": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(top_p=0.0)), "sampling.top_p"),
    "top_p above one": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(top_p=1.01)), "sampling.top_p"),
    "negative top_k": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(top_k=-1)), "sampling.top_k"),
    "too many stop strings": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(stop=[f"s{i}" for i in range(17)])),
                              "sampling.stop"),
    "empty stop string": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(stop=[""])), "sampling.stop"),
    "stop token out of range": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(stop_token_ids=[10**6])),
                                "sampling.stop_token_ids"),
    "cache_salt over 256 characters": (decode_pb2.GenerateRequest(prompt="hi", cache_salt="s" * 257), "cache_salt"),
    "presence_penalty above 2": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(presence_penalty=2.5)),
                                 "sampling.presence_penalty: must be in [-2, 2]"),
    "NaN frequency_penalty": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(frequency_penalty=float("nan"))),
                              "sampling.frequency_penalty"),
    "zero repetition_penalty": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(repetition_penalty=0.0)),
                                "sampling.repetition_penalty: must be in [0.01, 2]"),
    "min_tokens over max_tokens": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=4, min_tokens=5)),
                                   "sampling.min_tokens"),
    "logit_bias token out of range": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(logit_bias={10**6: 1.0})),
                                      "sampling.logit_bias: token id 1000000"),
    "logit_bias over 100": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(logit_bias={5: 1e9})),
                            "sampling.logit_bias"),
    "logit_bias with 10,000 entries": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(
        logit_bias={i: 1.0 for i in range(10_000)})), "sampling.logit_bias: at most 300"),
    "21 logprobs": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(logprobs=21)), "sampling.logprobs: must be in [0, 20]"),
    "empty structured_output": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(
        structured_output=common_pb2.StructuredOutput())), "sampling.structured_output"),
    "schema not JSON": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(
        structured_output=common_pb2.StructuredOutput(json_schema="{nope"))), "sampling.structured_output.json_schema"),
    "schema of an unknown type": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(
        structured_output=common_pb2.StructuredOutput(json_schema='{"type": "nope"}'))),
        "sampling.structured_output.json_schema: not a usable JSON Schema"),
    "schema over 64 KiB": (decode_pb2.GenerateRequest(prompt="hi", sampling=sampling(
        structured_output=common_pb2.StructuredOutput(json_schema='"' + "x" * 70_000 + '"'))),
        "sampling.structured_output.json_schema: must be 1 to 65536"),
    "resumed tokens breaking the grammar": (decode_pb2.GenerateRequest(prompt="hi", resume_token_ids=[28, 28], sampling=sampling(
        max_tokens=8, structured_output=common_pb2.StructuredOutput(json_object=True))), "resume_token_ids"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_rejects(secure, case):
    request, field = GENERATE_CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        generate(secure, request)
    assert err.value.code() == BAD, err.value.details()
    assert field in err.value.details()


@pytest.mark.parametrize("payload, field", [
    (b"\x12\x03\xff\xfe\xfd", "prompt"),                                        # prompt = invalid UTF-8
    (b"\x1a\x0b\x0a\x09\x0a\x04user\x12\x01\xc3", "messages.messages.content"),   # chat content cut mid-character
])
def test_invalid_utf8_is_invalid_argument_naming_the_field(secure, payload, field):
    with pytest.raises(grpc.RpcError) as err:
        raw_generate(secure, payload)
    assert err.value.code() == BAD
    assert field in err.value.details() and "UTF-8" in err.value.details()


def test_oversize_message_is_refused(secure):
    with pytest.raises(grpc.RpcError) as err:
        generate(secure, decode_pb2.GenerateRequest(prompt="x" * (9 << 20)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "message larger than max" in err.value.details().lower() or "received message" in err.value.details().lower()


@pytest.mark.parametrize("metadata", [(), ((API_KEY_HEADER, "Bearer wrong"),), ((API_KEY_HEADER, API_KEY),)])
def test_generate_without_the_api_key_is_unauthenticated(secure, metadata):
    with pytest.raises(grpc.RpcError) as err:
        generate(secure, decode_pb2.GenerateRequest(prompt="hi"), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "API key" in err.value.details()


def test_plaintext_client_cannot_talk_to_a_tls_server(secure):
    with pytest.raises(grpc.RpcError) as err:
        Client(f"127.0.0.1:{secure['ports']['decode']}", timeout_s=5, api_key=API_KEY).generate(prompt="hi")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_internal_rpcs_need_the_token(secure):
    prefill = prefill_pb2_grpc.PrefillServiceStub(channel(secure, "prefill"))
    with pytest.raises(grpc.RpcError) as err:
        prefill.Prefill(prefill_pb2.PrefillRequest(token_ids=[1, 2, 3]), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "internal token" in err.value.details()
    store = cache_pb2_grpc.CacheStoreStub(channel(secure, "cache_store"))
    with pytest.raises(grpc.RpcError) as err:
        store.PushBlocks(iter([cache_pb2.PushBlocksRequest(open=cache_pb2.PushOpen(fingerprint=b"x" * 16))]), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        list(store.PullBlocks(cache_pb2.PullBlocksRequest(fingerprint=b"x" * 16), timeout=30))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_prefill_with_token_rejects_bad_input(secure):
    prefill = prefill_pb2_grpc.PrefillServiceStub(channel(secure, "prefill"))
    with pytest.raises(grpc.RpcError) as err:
        prefill.Prefill(prefill_pb2.PrefillRequest(token_ids=[]), timeout=30, metadata=((INTERNAL_TOKEN_HEADER, TOKEN),))
    assert err.value.code() == BAD and "token_ids" in err.value.details()


PUSH_CASES = {
    "short fingerprint": ([cache_pb2.PushBlocksRequest(open=cache_pb2.PushOpen(fingerprint=b"abc"))], "open.fingerprint"),
    "chunk before open": ([cache_pb2.PushBlocksRequest(chunk=common_pb2.BlockChunk(data=b"x"))], "open"),
    "wrong layout": ([cache_pb2.PushBlocksRequest(open=cache_pb2.PushOpen(
        fingerprint=b"f" * 16, layout=common_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=3, head_dim=64,
                                                          dtype="float32", version=1)))], "open.layout"),
    "chunk without header": ([cache_pb2.PushBlocksRequest(open=cache_pb2.PushOpen(
        fingerprint=b"f" * 16, layout=common_pb2.KVLayout(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64,
                                                          dtype="float32", version=1))),
        cache_pb2.PushBlocksRequest(chunk=common_pb2.BlockChunk(data=b"abc", last=True))], "chunk.header"),
}


@pytest.mark.parametrize("case", list(PUSH_CASES))
def test_malformed_pushes_are_rejected(secure, case):
    messages, field = PUSH_CASES[case]
    store = cache_pb2_grpc.CacheStoreStub(channel(secure, "cache_store"))
    with pytest.raises(grpc.RpcError) as err:
        store.PushBlocks(iter(messages), timeout=30, metadata=((INTERNAL_TOKEN_HEADER, TOKEN),))
    assert err.value.code() == BAD
    assert field in err.value.details()
    assert secure["store"].pool.stats().blocks_used == 0  # nothing half-written became visible


def test_pull_with_a_bad_fingerprint_is_rejected(secure):
    store = cache_pb2_grpc.CacheStoreStub(channel(secure, "cache_store"))
    with pytest.raises(grpc.RpcError) as err:
        list(store.PullBlocks(cache_pb2.PullBlocksRequest(fingerprint=b"short"), timeout=30,
                              metadata=((INTERNAL_TOKEN_HEADER, TOKEN),)))
    assert err.value.code() == BAD and "fingerprint" in err.value.details()


def test_wrong_client_certificate_is_refused(secure):
    certs = secure["certs"]
    rogue = grpc.ssl_channel_credentials(open(certs.ca, "rb").read(), open(certs.rogue_key, "rb").read(),
                                         open(certs.rogue_cert, "rb").read())
    for service in ("cache_store", "prefill"):
        stub = health_pb2_grpc.HealthStub(channel(secure, service, credentials=rogue))
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_secure_cluster_still_answers_and_caches(secure):
    client = Client(f"127.0.0.1:{secure['ports']['decode']}", api_key=API_KEY, credentials=secure["tls"])
    messages = [("system", "You answer in one short sentence about shipping containers and their sizes."),
                ("user", "How long is a standard container?")]
    first = client.generate(messages=messages, max_tokens=6, temperature=0.0)
    secure["store"].flush_index()
    second = client.generate(messages=messages, max_tokens=6, temperature=0.0)
    client.close()
    assert first.token_ids == second.token_ids and len(first.token_ids) >= 1
    assert second.usage.cached_tokens > 0  # pushes and pulls went through mutual TLS with the token
    for service in ("decode", "prefill", "cache_store"):
        health = health_pb2_grpc.HealthStub(channel(secure, service)).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
