"""kvcluster.rpc.plumbing: typed exceptions become status codes in unary and streaming handlers; reflection."""

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvcluster import errors
from kvcluster.proto import cache_pb2, cache_pb2_grpc, common_pb2
from kvcluster.rpc import plumbing as rpc

RAISES = {
    b"invalid": errors.InvalidArgument("block_hashes", "5000 entries exceed the limit of 4096"),
    b"integrity": errors.IntegrityError("open.layout: mismatch"),
    b"exhausted": errors.ResourceExhausted("pool full"),
    b"missing": errors.NotFound("no such block"),
    b"down": errors.Unavailable("redis down"),
    b"bug": RuntimeError("secret internals"),
}
EXPECTED = {
    b"invalid": grpc.StatusCode.INVALID_ARGUMENT, b"integrity": grpc.StatusCode.INVALID_ARGUMENT,
    b"exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED, b"missing": grpc.StatusCode.NOT_FOUND,
    b"down": grpc.StatusCode.UNAVAILABLE, b"bug": grpc.StatusCode.INTERNAL,
}


class RaisingStore(cache_pb2_grpc.CacheStoreServicer):
    """Raises the exception its request names: unary (Lookup), server streaming (PullBlocks,
    after one message), client streaming (PushBlocks)."""

    def Lookup(self, request, context):
        raise RAISES[request.fingerprint]

    def PullBlocks(self, request, context):
        yield cache_pb2.PullBlocksResponse(chunk=common_pb2.BlockChunk(data=b"first", last=True))
        raise RAISES[request.fingerprint]

    def PushBlocks(self, request_iterator, context):
        opening = next(request_iterator)
        raise RAISES[opening.open.fingerprint]


@pytest.fixture(scope="module")
def stub():
    service = rpc.Service(RaisingStore(), cache_pb2_grpc.add_CacheStoreServicer_to_server,
                          rpc.service_name(cache_pb2, "CacheStore"))
    server, port = rpc.create_server([service], port=0, max_workers=4)
    server.start()
    channel = rpc.make_channel(f"127.0.0.1:{port}")
    yield cache_pb2_grpc.CacheStoreStub(channel)
    channel.close()
    server.stop(0)


@pytest.mark.parametrize("kind", list(RAISES))
def test_unary_errors_map_to_status_codes(stub, kind):
    with pytest.raises(grpc.RpcError) as failure:
        stub.Lookup(cache_pb2.LookupRequest(fingerprint=kind))
    assert failure.value.code() == EXPECTED[kind]


@pytest.mark.parametrize("kind", list(RAISES))
def test_errors_raised_mid_stream_map_to_status_codes(stub, kind):
    stream = stub.PullBlocks(cache_pb2.PullBlocksRequest(fingerprint=kind))
    assert next(stream).chunk.data == b"first"
    with pytest.raises(grpc.RpcError) as failure:
        next(stream)
    assert failure.value.code() == EXPECTED[kind]


@pytest.mark.parametrize("kind", [b"exhausted", b"bug"])
def test_client_streaming_errors_map_to_status_codes(stub, kind):
    requests = iter([cache_pb2.PushBlocksRequest(open=cache_pb2.PushOpen(fingerprint=kind))])
    with pytest.raises(grpc.RpcError) as failure:
        stub.PushBlocks(requests)
    assert failure.value.code() == EXPECTED[kind]


def test_messages_name_the_field_and_internal_errors_hide_details(stub):
    with pytest.raises(grpc.RpcError) as failure:
        stub.Lookup(cache_pb2.LookupRequest(fingerprint=b"invalid"))
    assert failure.value.details() == "block_hashes: 5000 entries exceed the limit of 4096"
    with pytest.raises(grpc.RpcError) as failure:
        stub.Lookup(cache_pb2.LookupRequest(fingerprint=b"bug"))
    assert "secret" not in failure.value.details() and "Lookup" in failure.value.details()


def test_reflection_lists_the_service_and_health():
    service = rpc.Service(RaisingStore(), cache_pb2_grpc.add_CacheStoreServicer_to_server,
                          rpc.service_name(cache_pb2, "CacheStore"))
    server, port = rpc.create_server([service], port=0, max_workers=2)
    server.start()
    try:
        with rpc.make_channel(f"127.0.0.1:{port}") as channel:
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"kvcluster.v1.CacheStore", "grpc.health.v1.Health"} <= names
    finally:
        server.stop(0)


def test_a_taken_port_is_unavailable_not_shared():
    service = rpc.Service(RaisingStore(), cache_pb2_grpc.add_CacheStoreServicer_to_server, "kvcluster.v1.CacheStore")
    first, port = rpc.create_server([service], port=0)
    first.start()
    try:
        with pytest.raises(errors.Unavailable, match=str(port)):
            rpc.create_server([service], port=port)
    finally:
        first.stop(0)


# ---- /metrics of every gRPC service (kvcluster.rpc.service_server.MetricsEndpoint) -------------------

@pytest.mark.parametrize("host, connect", [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"),
                                           ("localhost", "localhost"), ("[::]", "[::1]")])
def test_metrics_endpoint_serves_its_registry_and_stop_closes_the_port(host, connect):
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter

    from kvcluster.rpc.service_server import MetricsEndpoint

    registry = CollectorRegistry()
    Counter("kvc_probe", "a probe", registry=registry).inc(3)
    endpoint = MetricsEndpoint(registry, host, 0)
    port = endpoint.start()
    url = f"http://{connect}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200 and "kvc_probe_total 3.0" in response.read().decode()
    endpoint.stop()
    with pytest.raises(OSError):  # refused: the port is closed, not left to a background thread
        urllib.request.urlopen(url, timeout=5)
    assert MetricsEndpoint(registry, host, -1).start() is None  # below 0: no endpoint at all
