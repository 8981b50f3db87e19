"""gRPC plumbing shared by every kvcluster service: server setup, the error interceptor, channels.

Every server gets gRPC health checking (each service name and the overall "" set SERVING) and
reflection by default, the same message-size limits as the clients, and exactly one interceptor
that turns kvcluster's typed exceptions into status codes, so handlers never build statuses by
hand:

    InvalidArgument   -> INVALID_ARGUMENT   (message "field: problem, limit")
    IntegrityError    -> INVALID_ARGUMENT   (see below)
    ResourceExhausted -> RESOURCE_EXHAUSTED
    NotFound          -> NOT_FOUND
    Unavailable       -> UNAVAILABLE
    RequestFailed     -> ABORTED            (the engine failed on this one request; the rest went on)
    anything else     -> INTERNAL           (logged with its traceback; the client sees no details)

IntegrityError maps to INVALID_ARGUMENT rather than DATA_LOSS: a server only detects integrity
failures in bytes or metadata a caller sent (a checksum that does not match the payload, a layout
or fingerprint the server does not accept, a truncated stream). The caller's input is wrong, the
server lost nothing, and retrying the same request cannot succeed; DATA_LOSS would wrongly suggest
the server corrupted its own data.
"""

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvcluster import errors
from kvcluster.rpc.security import TokenInterceptor, with_metadata

log = logging.getLogger(__name__)

# A block chunk is at most 1 MiB of payload plus its header; 8 MiB leaves room for any request
# (a pull of a few thousand block references) without letting one message take unbounded memory.
MAX_MESSAGE_BYTES = 8 << 20

# Wire type of a packed element by FieldDescriptor type: double/fixed64/sfixed64 are 1,
# float/fixed32/sfixed32 are 5, every other number (ints, bools, enums) a varint (0).
_PACKED_WIRE_TYPES = {1: 1, 6: 1, 16: 1, 2: 5, 7: 5, 15: 5}

STATUS_BY_ERROR: dict[type[errors.KVClusterError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.IntegrityError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.RequestFailed: grpc.StatusCode.ABORTED,
}


@dataclass(frozen=True)
class Service:
    """One servicer to register: its object, the generated `add_*_to_server`, its full name."""

    servicer: object
    add_to_server: Callable[[object, grpc.Server], None]
    name: str  # e.g. "kvcluster.v1.CacheStore"


def service_name(pb2_module, service: str) -> str:
    """Full name of `service` as declared in a generated `*_pb2` module."""
    return pb2_module.DESCRIPTOR.services_by_name[service].full_name


# A peer that refused connections (a store or worker restarting on its address) is tried again within
# 2 s: gRPC's default backoff grows to 120 s, and a channel in backoff fails every call at once
# (UNAVAILABLE), so a restarted store stayed unreachable from a worker for minutes. The connect timeout
# (grpc.min_reconnect_backoff_ms, 20 s) stays: a slow handshake is not a refusal.
RECONNECT_BACKOFF_MS = {"grpc.initial_reconnect_backoff_ms": 200,
                        "grpc.max_reconnect_backoff_ms": 2000}


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes), *RECONNECT_BACKOFF_MS.items()]


def make_channel(target: str, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, object]] = (), credentials: grpc.ChannelCredentials | None = None,
                 metadata: Sequence[tuple[str, str]] = ()) -> grpc.Channel:
    """A channel to `target` ("host:port") with the servers' message-size limits; TLS when `credentials`
    are given; `metadata` (e.g. the internal token) rides on every call."""
    opts = [*channel_options(max_message_bytes), *options]
    channel = (grpc.secure_channel(target, credentials, options=opts) if credentials is not None
               else grpc.insecure_channel(target, options=opts))
    return with_metadata(channel, metadata)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for error_type, code in STATUS_BY_ERROR.items():
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, method: str, exc: Exception) -> None:
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        raise exc  # the handler (or grpc) already ended the call; keep that status
    status = status_for(exc)
    if status == grpc.StatusCode.INTERNAL:
        if context.is_active():
            log.exception("%s failed", method)
        else:  # the client went away mid-call; the failure is a consequence, not a bug
            log.debug("%s ended after the client left: %r", method, exc)
        context.abort(status, f"internal error in {method}")
    context.abort(status, str(exc))


class _Unparsable:
    """Stands in for a request message the deserializer could not parse."""

    def __init__(self, message_type, raw: bytes):
        self.error = describe_parse_error(message_type, raw)


def describe_parse_error(message_type, raw: bytes) -> errors.InvalidArgument:
    """Name the field that made `raw` unparsable: a string that is not UTF-8, a length or varint
    running past the end, a broken packed list; a broken tag is blamed on the enclosing field."""
    broken = _broken_field(message_type.DESCRIPTOR, raw, "") if message_type is not None else None
    if broken is not None:
        return errors.InvalidArgument(*broken)
    return errors.InvalidArgument("request", f"is not a valid {getattr(message_type, '__name__', 'message')}")


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    """A varint at `pos` and the position after it; IndexError past the end, ValueError if over 10 bytes."""
    value = 0
    for shift in range(0, 70, 7):
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")


def _skip(raw: bytes, pos: int, wire_type: int) -> tuple[bytes | None, int]:
    """Skip one value of `wire_type`; its bytes when length-delimited. IndexError/ValueError if broken."""
    if wire_type == 0:
        return None, _varint(raw, pos)[1]
    if wire_type in (1, 5):
        end = pos + (8 if wire_type == 1 else 4)
    else:
        size, pos = _varint(raw, pos)
        end = pos + size
    if end > len(raw):
        raise IndexError("value runs past the end")
    return (raw[pos:end] if wire_type == 2 else None), end


def _broken_field(descriptor, raw: bytes, prefix: str) -> tuple[str, str] | None:
    """Walk the wire format: (dotted field name, problem) where parsing breaks, or None."""
    enclosing = prefix[:-1] or "request"
    pos = 0
    while pos < len(raw):
        try:
            key, pos = _varint(raw, pos)
        except (IndexError, ValueError):
            return enclosing, "has a broken field tag"
        number, wire_type = key >> 3, key & 7
        if number == 0 or wire_type not in (0, 1, 2, 5):
            return enclosing, "has a broken field tag"
        field = descriptor.fields_by_number.get(number)
        name = prefix + field.name if field is not None else enclosing
        try:
            chunk, pos = _skip(raw, pos, wire_type)
        except (IndexError, ValueError):
            return name, "is truncated or malformed"
        if field is not None and chunk is not None:
            problem = _broken_value(field, chunk, name)
            if problem is not None:
                return problem
    return None


def _broken_value(field, chunk: bytes, name: str) -> tuple[str, str] | None:
    """What is wrong with a length-delimited value of `field`, if anything."""
    if field.type == field.TYPE_STRING:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            return name, "is not valid UTF-8"
    elif field.type == field.TYPE_MESSAGE:
        return _broken_field(field.message_type, chunk, name + ".")
    elif field.type != field.TYPE_BYTES:  # a packed list of numbers
        wire_type, pos = _PACKED_WIRE_TYPES.get(field.type, 0), 0
        try:
            while pos < len(chunk):
                pos = _skip(chunk, pos, wire_type)[1]
        except (IndexError, ValueError):
            return name, "holds a malformed packed value"
    return None


def _tolerant(deserializer: Callable | None) -> Callable | None:
    """A deserializer that returns _Unparsable instead of failing (gRPC would answer INTERNAL)."""
    if deserializer is None:
        return None
    message_type = getattr(deserializer, "__self__", None)

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except Exception:
            return _Unparsable(message_type, raw)
    return parse


def _checked(request):
    """The request, or for a client stream an iterator over it, raising on unparsable messages."""
    if isinstance(request, _Unparsable):
        raise request.error
    if hasattr(request, "DESCRIPTOR"):
        return request
    return (_checked(item) for item in request)


def _map_unary(behaviour: Callable, method: str) -> Callable:
    def handler(request, context):
        try:
            return behaviour(_checked(request), context)
        except Exception as exc:
            _abort(context, method, exc)
    return handler


def _map_stream(behaviour: Callable, method: str) -> Callable:
    # Streaming responses are generators: exceptions surface while iterating, after the
    # handler has returned, so the generator itself is wrapped.
    def handler(request, context) -> Iterator:
        try:
            yield from behaviour(_checked(request), context)
        except Exception as exc:
            _abort(context, method, exc)
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps typed kvcluster exceptions to status codes for unary and streaming handlers."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            wrap, behaviour, make = _map_unary, handler.unary_unary, grpc.unary_unary_rpc_method_handler
        elif handler.stream_unary:
            wrap, behaviour, make = _map_unary, handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.unary_stream:
            wrap, behaviour, make = _map_stream, handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            wrap, behaviour, make = _map_stream, handler.stream_stream, grpc.stream_stream_rpc_method_handler
        return make(wrap(behaviour, method), request_deserializer=_tolerant(handler.request_deserializer),
                    response_serializer=handler.response_serializer)


@dataclass
class RpcServer:
    """A built gRPC server and its health servicer; `stop` reports NOT_SERVING before draining."""

    server: grpc.Server
    health: health.HealthServicer
    service_names: tuple[str, ...]

    def start(self) -> None:
        self.server.start()

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace_s: float | None) -> None:
        """Stop accepting calls, give in-flight ones `grace_s` seconds, then cancel them."""
        self.set_serving(False)
        self.server.stop(grace_s).wait()

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout_s)


def create_server(services: Sequence[Service], port: int, host: str = "127.0.0.1",
                  max_workers: int = 16, max_message_bytes: int = MAX_MESSAGE_BYTES,
                  enable_health: bool = True, enable_reflection: bool = True,
                  credentials: grpc.ServerCredentials | None = None,
                  guards: dict[str, tuple[str, str, str]] | None = None) -> tuple[RpcServer, int]:
    """Build (not start) a server on host:port; port 0 binds a free port. Returns it and the bound port.
    `credentials` make it TLS; `guards` (kvcluster.rpc.security.token_guards) demand tokens on methods."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[*([TokenInterceptor(guards)] if guards else []), ErrorInterceptor()],
        # A second server on a taken port must fail, not silently share it.
        options=[*channel_options(max_message_bytes), ("grpc.so_reuseport", 0)])
    for service in services:
        service.add_to_server(service.servicer, server)
    names = tuple(service.name for service in services)
    health_servicer = health.HealthServicer()
    if enable_health:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if enable_reflection:
        reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = _bind(server, host, port, credentials)
    rpc_server = RpcServer(server, health_servicer, names)
    rpc_server.set_serving(True)
    return rpc_server, bound


def _bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise errors.Unavailable(f"cannot bind gRPC server to {address}: {exc}") from exc
    if bound == 0:  # older grpc releases report failure this way
        raise errors.Unavailable(f"cannot bind gRPC server to {address}")
    return bound
