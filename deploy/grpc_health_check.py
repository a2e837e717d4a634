#!/usr/bin/env python3
"""Container health check: exit 0 if the gRPC server on 127.0.0.1:PORT is SERVING.

Usage: flywheel-healthcheck PORT

Asks the standard grpc.health.v1.Health/Check for service "" with raw protobuf bytes, so it
needs only grpcio (not the generated health stubs) and works in every Flywheel image.
Kubernetes does not use it (the chart uses native gRPC probes); compose and `docker run` do.
"""

import sys

import grpc

CHECK_METHOD = "/grpc.health.v1.Health/Check"
EMPTY_REQUEST = b""  # HealthCheckRequest(service="") encodes to zero bytes.
SERVING = b"\x08\x01"  # HealthCheckResponse(status=SERVING): field 1, varint 1.


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: flywheel-healthcheck PORT", file=sys.stderr)
        return 2
    with grpc.insecure_channel(f"127.0.0.1:{argv[1]}") as channel:
        check = channel.unary_unary(CHECK_METHOD)
        try:
            reply = check(EMPTY_REQUEST, timeout=3.0)
        except grpc.RpcError as err:
            print(f"health check failed: {err.code().name}", file=sys.stderr)
            return 1
    if reply != SERVING:
        print(f"not serving: {reply!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
