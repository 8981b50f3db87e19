#!/usr/bin/env python3
"""Container health check: exit 0 when a gRPC server reports SERVING, 1 otherwise.

Usage: kvc-grpc-health HOST:PORT [SERVICE]   (SERVICE "" = the whole server, the default)

Every kvcluster server runs the standard grpc.health.v1 service, so this asks it directly;
docker-compose health checks call it inside the image (Kubernetes uses its native gRPC probe,
or this as an exec probe once TLS is on: the kubelet's gRPC probe cannot speak TLS).

It reads the service's own TLS settings from the environment it shares with the service: when
KVC_TLS_CERT is set (the server speaks TLS) it trusts KVC_TLS_CA (else the certificate itself)
and presents KVC_TLS_CLIENT_CERT/KVC_TLS_CLIENT_KEY when set (a server that demands client
certificates). It dials HOST as given, so the server certificate must name it (e.g. 127.0.0.1).
"""

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_SECONDS = 3.0


def channel_credentials(environ: Mapping[str, str]) -> grpc.ChannelCredentials | None:
    """TLS credentials matching the service's server settings, or None for plaintext."""
    if not environ.get("KVC_TLS_CERT"):
        return None
    trusted = Path(environ.get("KVC_TLS_CA") or environ["KVC_TLS_CERT"]).read_bytes()
    cert, key = environ.get("KVC_TLS_CLIENT_CERT"), environ.get("KVC_TLS_CLIENT_KEY")
    if cert and key:
        return grpc.ssl_channel_credentials(trusted, Path(key).read_bytes(), Path(cert).read_bytes())
    return grpc.ssl_channel_credentials(trusted)


def open_channel(address: str, environ: Mapping[str, str]) -> grpc.Channel:
    credentials = channel_credentials(environ)
    return grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)


def is_serving(address: str, service: str = "", environ: Mapping[str, str] = os.environ) -> bool:
    """One Check call; a failed call or any status but SERVING counts as unhealthy."""
    with open_channel(address, environ) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"{address}: {status}", file=sys.stderr)
        return False
    return True


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    return 0 if is_serving(*argv) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
