"""grpcio (Debian's python3-grpcio) as a real gRPC client of our server.

usage: grpc_client.py SOCKET SCENARIO  — prints one result line.
"""
import sys
import grpc

sock, scenario = sys.argv[1], sys.argv[2]
channel = grpc.insecure_channel("unix:" + sock, options=[
    ("grpc.max_receive_message_length", 32 << 20),
    ("grpc.max_send_message_length", 32 << 20),
])
echo = channel.unary_unary("/test.Echo/Echo")


def code_of(fn):
    try:
        fn()
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details()


if scenario == "unary":
    r = echo(b"hello", metadata=[("containerd-namespace", "k8s.io")], timeout=5)
    print("ok", r.decode())
elif scenario == "stream":
    parts = [m.decode() for m in channel.unary_stream("/test.Echo/Count")(b"5", timeout=5)]
    print("ok", ",".join(parts))
elif scenario == "deadline":
    code, details = code_of(lambda: echo(b"hang", timeout=0.2))
    print(code)
elif scenario == "unimplemented":
    code, details = code_of(lambda: channel.unary_unary("/test.Echo/Nope")(b"", timeout=5))
    print(code, details)
elif scenario == "error":
    code, details = code_of(lambda: channel.unary_unary("/test.Echo/Fail")(b"", timeout=5))
    print(code, details)
elif scenario == "big":
    payload = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    r = echo(payload, timeout=30)
    print("ok", len(r), r == payload)
elif scenario == "concurrent":
    futures = [echo.future(b"m%d" % i, timeout=20) for i in range(200)]
    good = sum(1 for i, f in enumerate(futures) if f.result() == b"m%d" % i)
    print("ok", good)
elif scenario == "toolarge":
    code, details = code_of(lambda: echo(b"x" * (17 << 20), timeout=30))
    after = echo(b"still here", timeout=5).decode()
    print(code, after)
else:
    print("unknown scenario", scenario)
    sys.exit(2)
channel.close()
