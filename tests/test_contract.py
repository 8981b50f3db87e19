"""The generated gRPC contract: services, methods, and raw-bytes block payloads."""

from google.protobuf.descriptor import FieldDescriptor

from kvcluster.proto import cache_pb2, cache_pb2_grpc, common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc


def methods(pb2, service: str) -> dict[str, tuple[bool, bool]]:
    desc = pb2.DESCRIPTOR.services_by_name[service]
    return {m.name: (m.client_streaming, m.server_streaming) for m in desc.methods}


def test_services_and_streaming_shapes():
    assert methods(decode_pb2, "DecodeService") == {"Generate": (False, True), "ResetPrefixCache": (False, False)}
    assert methods(prefill_pb2, "PrefillService") == {"Prefill": (False, False), "PrefillStream": (False, True)}
    assert methods(cache_pb2, "CacheStore") == {
        "PushBlocks": (True, False), "PullBlocks": (False, True), "Lookup": (False, False), "Stats": (False, False)}
    assert all(hasattr(m, n) for m, n in [(decode_pb2_grpc, "DecodeServiceStub"), (prefill_pb2_grpc, "PrefillServiceStub"),
                                          (cache_pb2_grpc, "CacheStoreServicer")])


def test_block_payload_is_raw_bytes_not_repeated_floats():
    data = common_pb2.BlockChunk.DESCRIPTOR.fields_by_name["data"]
    assert data.type == FieldDescriptor.TYPE_BYTES
    for message in (common_pb2.BlockChunk, common_pb2.BlockRef, cache_pb2.PushBlocksRequest, cache_pb2.PullBlocksResponse):
        assert all(f.type not in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE) for f in message.DESCRIPTOR.fields)


def test_generate_request_input_oneof_and_sampling_defaults():
    req = decode_pb2.GenerateRequest(prompt="hi")
    assert req.WhichOneof("input") == "prompt"
    req = decode_pb2.GenerateRequest(token_ids=decode_pb2.TokenIds(ids=[1, 2]))
    assert req.WhichOneof("input") == "token_ids"
    sampling = common_pb2.SamplingParams()
    assert not sampling.HasField("max_tokens") and not sampling.HasField("temperature") and not sampling.HasField("seed")


def test_usage_carries_timing_breakdown():
    timing = decode_pb2.Timing.DESCRIPTOR.fields_by_name
    assert {"lookup_ms", "prefill_ms", "kv_pull_ms", "first_token_ms"} <= set(timing)
    usage = decode_pb2.Usage.DESCRIPTOR.fields_by_name
    assert {"prompt_tokens", "cached_tokens", "computed_tokens", "completion_tokens", "bytes_pulled"} <= set(usage)
