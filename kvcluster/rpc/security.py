"""TLS (optionally mutual) for every gRPC server and client, an API key on decode's public methods
(Generate, ResetPrefixCache), and a shared token on every internal RPC (push, pull, lookup, stats,
prefill), so a client can neither write into the cache nor ask what it holds.

Every service config inherits `SecuritySettings`: `--tls-cert/--tls-key` make its server speak TLS
(`--tls-client-ca` also demands client certificates); `--tls-ca` makes its outgoing calls speak
TLS (`--tls-client-cert/--tls-client-key` present a certificate); `--internal-token` is required
on internal RPCs it serves and sent on the ones it makes. Health checks and reflection stay open:
they reveal nothing a port scan would not. Redis password and TLS come with the URL
(`redis://:PASSWORD@host:6379/0`, `rediss://...`).

Tokens and API keys are compared in constant time (`hmac.compare_digest`), so how long a refusal
takes does not tell a guesser how many leading characters were right.
"""

import hmac
from collections.abc import Sequence
from pathlib import Path

import grpc

from kvcluster.config import ServiceConfig, setting
from kvcluster.errors import InvalidArgument

API_KEY_HEADER = "authorization"          # "Bearer <key>", as OpenAI-style clients send it
INTERNAL_TOKEN_HEADER = "x-kvc-internal-token"
# Lookup and Stats are guarded too: which blocks a store holds tells an outsider which prompts
# were asked recently, and Stats shows the pool's contents at a glance.
INTERNAL_METHODS = ("/kvcluster.v1.CacheStore/PushBlocks", "/kvcluster.v1.CacheStore/PullBlocks",
                    "/kvcluster.v1.CacheStore/Lookup", "/kvcluster.v1.CacheStore/Stats",
                    "/kvcluster.v1.PrefillService/Prefill")
GENERATE_METHOD = "/kvcluster.v1.DecodeService/Generate"
# A decode worker's public methods: with --api-key set they require it (the gateway sends its
# decode_api_key). Resetting the prefix cache costs others speed, never an answer, so it takes the
# same key as Generate.
API_KEY_METHODS = (GENERATE_METHOD, "/kvcluster.v1.DecodeService/ResetPrefixCache")


class SecuritySettings(ServiceConfig):
    """TLS and token fields shared by every service config."""

    tls_cert: str = setting("", "PEM certificate the gRPC server presents; with --tls-key enables TLS")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_client_ca: str = setting("", "PEM CA bundle; when set the server requires client certificates it signed (mutual TLS)")
    tls_ca: str = setting("", "PEM CA bundle trusted for outgoing gRPC calls; when set they use TLS")
    tls_client_cert: str = setting("", "PEM certificate presented on outgoing gRPC calls (mutual TLS)")
    tls_client_key: str = setting("", "PEM private key of --tls-client-cert")
    internal_token: str = setting("", "shared secret required on internal RPCs (push, pull, lookup, stats, prefill) "
                                  "and sent on outgoing ones; also keys the block hashes (kvcluster.kv.blocks)")

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not (self.tls_cert or self.tls_key):
            return None
        if not (self.tls_cert and self.tls_key):
            raise InvalidArgument("tls_cert/tls_key", "TLS needs both a certificate and its key")
        client_ca = _read(self.tls_client_ca, "tls_client_ca") if self.tls_client_ca else None
        return grpc.ssl_server_credentials([(_read(self.tls_key, "tls_key"), _read(self.tls_cert, "tls_cert"))],
                                           root_certificates=client_ca, require_client_auth=client_ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls_ca:
            return None
        cert = _read(self.tls_client_cert, "tls_client_cert") if self.tls_client_cert else None
        key = _read(self.tls_client_key, "tls_client_key") if self.tls_client_key else None
        return grpc.ssl_channel_credentials(_read(self.tls_ca, "tls_ca"), key, cert)

    def outgoing_metadata(self) -> tuple[tuple[str, str], ...]:
        return internal_metadata(self.internal_token)


def internal_metadata(internal_token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `internal_token` (none without a token)."""
    return ((INTERNAL_TOKEN_HEADER, internal_token),) if internal_token else ()


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(field, f"cannot read {path}: {exc.strerror}") from None


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls to guarded methods without the right token (UNAUTHENTICATED), before any work."""

    def __init__(self, guards: dict[str, tuple[str, str, str]]):
        # full method name -> (metadata key, expected value, what to call it in the error)
        self.guards = guards

    def intercept_service(self, continuation, handler_call_details):
        guard = self.guards.get(handler_call_details.method)
        if guard is not None:
            key, expected, label = guard
            sent = dict(handler_call_details.invocation_metadata or ()).get(key)
            if not _same_secret(sent, expected):
                return _deny(continuation(handler_call_details), f"missing or wrong {label} ({key} metadata)")
        return continuation(handler_call_details)


def _same_secret(sent: str | bytes | None, expected: str) -> bool:
    """Constant-time equality (for equal lengths), so timing reveals no matching prefix."""
    if sent is None:
        return False
    sent_bytes = sent if isinstance(sent, bytes) else sent.encode()
    return hmac.compare_digest(sent_bytes, expected.encode())


def _deny(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler | None:
    if handler is None:
        return None

    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(abort, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def token_guards(internal_token: str = "", api_key: str = "") -> dict[str, tuple[str, str, str]]:
    guards = {m: (INTERNAL_TOKEN_HEADER, internal_token, "internal token") for m in INTERNAL_METHODS if internal_token}
    if api_key:
        guards.update({m: (API_KEY_HEADER, f"Bearer {api_key}", "API key") for m in API_KEY_METHODS})
    return guards


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (a token) to every call on a channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self.metadata = tuple(metadata)

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


def with_metadata(channel: grpc.Channel, metadata: Sequence[tuple[str, str]]) -> grpc.Channel:
    return grpc.intercept_channel(channel, _MetadataInterceptor(metadata)) if metadata else channel
