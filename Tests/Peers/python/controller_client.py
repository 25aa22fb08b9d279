#!/usr/bin/python3
"""containerd 2.x's sandbox Controller calls, made with grpcio against kuasar's API socket.
Usage: controller_client.py STUBS_DIR SOCKET SANDBOX_ID
Prints `address <addr>` after Start and waits for a line on stdin (the test runs a
container through the Task API meanwhile), then stops, waits and shuts the sandbox down.
Every check that fails exits non-zero with the reason."""
import sys, time
sys.path.insert(0, sys.argv[1])
import grpc
from google.protobuf import any_pb2
from containerd.services.sandbox.v1 import sandbox_pb2 as sb
from cri import pod_sandbox_config_pb2 as cri

sock, sid = sys.argv[2], sys.argv[3]
channel = grpc.insecure_channel("unix://" + sock)
md = (("containerd-namespace", "k8s.io"),)

def call(method, req, resp_type, timeout=10):
    rpc = channel.unary_unary("/containerd.services.sandbox.v1.Controller/" + method,
                              request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=resp_type.FromString)
    return rpc(req, timeout=timeout, metadata=md)

def expect_code(code, method, req, resp_type, what):
    try:
        call(method, req, resp_type)
    except grpc.RpcError as e:
        if e.code() != code:
            sys.exit(f"{what}: expected {code}, got {e.code()}: {e.details()}")
        print(f"ok {what}: {e.code().name}: {e.details()}", flush=True)
        return
    sys.exit(f"{what}: expected {code}, got OK")

def check(cond, what):
    if not cond:
        sys.exit("check failed: " + what)

# Bad input first: each is refused with the right code and the daemon keeps serving.
expect_code(grpc.StatusCode.INVALID_ARGUMENT, "Create", sb.ControllerCreateRequest(sandbox_id="x1", sandboxer="nope"),
            sb.ControllerCreateResponse, "unknown sandboxer")
bad = any_pb2.Any(type_url="type.googleapis.com/runtime.v1.PodSandboxConfig", value=b"\xff\xff\xff")
expect_code(grpc.StatusCode.INVALID_ARGUMENT, "Create", sb.ControllerCreateRequest(sandbox_id="x2", sandboxer="kuasar", options=bad),
            sb.ControllerCreateResponse, "malformed options")
expect_code(grpc.StatusCode.INVALID_ARGUMENT, "Create", sb.ControllerCreateRequest(sandbox_id="../x", sandboxer="kuasar"),
            sb.ControllerCreateResponse, "path trick in the id")
expect_code(grpc.StatusCode.NOT_FOUND, "Start", sb.ControllerStartRequest(sandbox_id=sid, sandboxer="kuasar"),
            sb.ControllerStartResponse, "start before create")
expect_code(grpc.StatusCode.NOT_FOUND, "Shutdown", sb.ControllerShutdownRequest(sandbox_id="never-seen", sandboxer="kuasar"),
            sb.ControllerShutdownResponse, "shutdown of an unknown id")

config = cri.PodSandboxConfig(hostname="pod-host", log_directory="/tmp/logs",
                              metadata=cri.PodSandboxMetadata(name="p", uid="u1", namespace="default"),
                              dns_config=cri.DNSConfig(servers=["10.0.0.10"], searches=["svc.local"], options=["ndots:5"]))
opts = any_pb2.Any(type_url="type.googleapis.com/runtime.v1.PodSandboxConfig", value=config.SerializeToString())
r = call("Create", sb.ControllerCreateRequest(sandbox_id=sid, sandboxer="kuasar", options=opts), sb.ControllerCreateResponse)
check(r.sandbox_id == sid, "create answers the id")
expect_code(grpc.StatusCode.ALREADY_EXISTS, "Create", sb.ControllerCreateRequest(sandbox_id=sid, sandboxer="kuasar"),
            sb.ControllerCreateResponse, "create twice")
st = call("Status", sb.ControllerStatusRequest(sandbox_id=sid, sandboxer="kuasar"), sb.ControllerStatusResponse)
check(st.state == "SANDBOX_NOTREADY" and st.address == "", f"created, not ready: {st}")
r = call("Start", sb.ControllerStartRequest(sandbox_id=sid, sandboxer="kuasar"), sb.ControllerStartResponse)
check(r.address.startswith("ttrpc+unix://") and r.address.endswith("/" + sid + "/task.sock"), f"address {r.address}")
check(r.version == 3 and r.pid > 0 and r.created_at.seconds > 0, f"start answer {r}")
expect_code(grpc.StatusCode.FAILED_PRECONDITION, "Start", sb.ControllerStartRequest(sandbox_id=sid, sandboxer="kuasar"),
            sb.ControllerStartResponse, "double start")
p = call("Platform", sb.ControllerPlatformRequest(sandbox_id=sid, sandboxer="kuasar"), sb.ControllerPlatformResponse)
check(p.platform.os == "linux" and p.platform.architecture in ("amd64", "arm64"), f"platform {p}")
print("address " + r.address, flush=True)
sys.stdin.readline()  # the test runs a container in the sandbox meanwhile

st = call("Status", sb.ControllerStatusRequest(sandbox_id=sid, sandboxer="kuasar", verbose=True), sb.ControllerStatusResponse)
check(st.state == "SANDBOX_READY" and st.version == 3 and st.address == r.address, f"ready status {st}")
check('"containers"' in st.info["info"] and '"c1"' in st.info["info"], f"verbose info {st.info}")
m = call("Metrics", sb.ControllerMetricsRequest(sandbox_id=sid, sandboxer="kuasar"), sb.ControllerMetricsResponse)
check(m.metrics.id == sid and m.metrics.data.type_url.startswith("io.containerd.cgroups."), f"metrics {m.metrics.data.type_url}")
# Update: labels, extensions, and the sandbox spec's resources on its cgroup parent.
import json
from containerd.types import sandbox_pb2 as tsb
spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec",
                   value=json.dumps({"ociVersion": "1.0.2", "linux": {"resources": {"memory": {"limit": 268435456}}}}).encode())
ext = any_pb2.Any(type_url="example.com/Thing", value=b"\x01\x02")
call("Update", sb.ControllerUpdateRequest(sandbox_id=sid, sandboxer="kuasar", fields=["labels", "extensions", "spec"],
                                          sandbox=tsb.Sandbox(sandbox_id=sid, labels={"tier": "edge"}, spec=spec, extensions={"x": ext})),
     sb.ControllerUpdateResponse)
expect_code(grpc.StatusCode.INVALID_ARGUMENT, "Update", sb.ControllerUpdateRequest(sandbox_id=sid, sandboxer="kuasar", fields=["runtime"]),
            sb.ControllerUpdateResponse, "update of a field that cannot change")
st = call("Status", sb.ControllerStatusRequest(sandbox_id=sid, sandboxer="kuasar", verbose=True), sb.ControllerStatusResponse)
info = json.loads(st.info["info"])
check(info["labels"] == {"tier": "edge"} and info["extensions"] == ["x"], f"updated info {info}")
m = call("Metrics", sb.ControllerMetricsRequest(sandbox_id=sid, sandboxer="kuasar"), sb.ControllerMetricsResponse)
if m.metrics.data.type_url.endswith("cgroups.v1.Metrics"):
    from cgroups import v1_metrics_pb2
    limit = v1_metrics_pb2.Metrics.FromString(m.metrics.data.value).memory.usage.limit
else:
    from cgroups import v2_metrics_pb2
    limit = v2_metrics_pb2.Metrics.FromString(m.metrics.data.value).memory.usage_limit
check(limit == 268435456, f"sandbox memory limit after Update: {limit}")
print("ok update: labels, extensions, memory limit on the sandbox cgroup", flush=True)
# A client that disconnects in the middle of Wait must not disturb anything.
try:
    call("Wait", sb.ControllerWaitRequest(sandbox_id=sid, sandboxer="kuasar"), sb.ControllerWaitResponse, timeout=0.2)
    sys.exit("wait returned before stop")
except grpc.RpcError as e:
    check(e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, f"wait deadline: {e.code()}")
t0 = time.time()
call("Stop", sb.ControllerStopRequest(sandbox_id=sid, sandboxer="kuasar", timeout_secs=1), sb.ControllerStopResponse)
took = time.time() - t0
# The container's init (pid 1 of its namespace) ignores SIGTERM: SIGKILL after the timeout.
check(0.9 < took < 3, f"stop honours timeout_secs=1: took {took:.3f}s")
w = call("Wait", sb.ControllerWaitRequest(sandbox_id=sid, sandboxer="kuasar"), sb.ControllerWaitResponse)
check(w.exited_at.seconds > 0, f"wait answer {w}")
call("Stop", sb.ControllerStopRequest(sandbox_id=sid, sandboxer="kuasar"), sb.ControllerStopResponse)  # idempotent
st = call("Status", sb.ControllerStatusRequest(sandbox_id=sid, sandboxer="kuasar"), sb.ControllerStatusResponse)
check(st.state == "SANDBOX_NOTREADY" and st.exited_at.seconds > 0, f"stopped status {st}")
call("Shutdown", sb.ControllerShutdownRequest(sandbox_id=sid, sandboxer="kuasar"), sb.ControllerShutdownResponse)
call("Shutdown", sb.ControllerShutdownRequest(sandbox_id=sid, sandboxer="kuasar"), sb.ControllerShutdownResponse)  # idempotent
expect_code(grpc.StatusCode.NOT_FOUND, "Status", sb.ControllerStatusRequest(sandbox_id=sid, sandboxer="kuasar"),
            sb.ControllerStatusResponse, "status after shutdown")
print(f"done stop took {time.time() - t0:.3f}s", flush=True)
