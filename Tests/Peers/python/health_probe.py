"""grpcio with the standard health stubs (PyPI grpcio-health-checking, the release
that matches Debian's grpcio 1.51) as a grpc_health_probe-style client.

usage: health_probe.py SOCKET check SERVICE        prints STATUS or CODE details
       health_probe.py SOCKET watch SERVICE N      prints each status as it comes (at
                                                   most N), then END CODE when the
                                                   stream ends; READY after the first
"""
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sock, mode, service = sys.argv[1], sys.argv[2], sys.argv[3]
channel = grpc.insecure_channel("unix:" + sock)
stub = health_pb2_grpc.HealthStub(channel)
name = health_pb2.HealthCheckResponse.ServingStatus.Name

if mode == "check":
    try:
        r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        print(name(r.status))
    except grpc.RpcError as e:
        print(e.code().name, e.details())
elif mode == "watch":
    limit = int(sys.argv[4])
    seen = 0
    try:
        for r in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30):
            print(name(r.status), flush=True)
            seen += 1
            if seen >= limit:
                break
        print("END OK", flush=True)
    except grpc.RpcError as e:
        print("END", e.code().name, flush=True)
