#!/usr/bin/env python3
"""Container health check: exit 0 when a gRPC server reports SERVING, 1 otherwise.

Usage: kvc-grpc-health HOST:PORT [SERVICE]   (SERVICE "" = the whole server, the default)

Every kvcluster server runs the standard grpc.health.v1 service, so this asks it directly;
docker-compose health checks call it inside the image (Kubernetes uses its native gRPC probe).
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_SECONDS = 3.0


def is_serving(address: str, service: str = "") -> bool:
    """One Check call; a failed call or any status but SERVING counts as unhealthy."""
    with grpc.insecure_channel(address) as channel:
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
