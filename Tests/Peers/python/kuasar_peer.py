"""Clients for kuasar's two APIs, for the Python test peers: the sandbox Controller over
gRPC (grpcio) and the Task API over ttrpc (a small client written here from the frame
format: 10-byte header, then a ttrpc.Request/Response protobuf)."""
import socket, struct, sys, threading

def load_stubs(stubs_dir):
    sys.path.insert(0, stubs_dir)

class Controller:
    """containerd.services.sandbox.v1.Controller on the daemon's API socket."""
    def __init__(self, sock):
        import grpc
        from containerd.services.sandbox.v1 import sandbox_pb2
        self.grpc, self.sb = grpc, sandbox_pb2
        self.channel = grpc.insecure_channel("unix://" + sock)
        self.md = (("containerd-namespace", "k8s.io"),)
        self.rpcs = {}

    def call(self, method, req, timeout=30):
        rpc = self.rpcs.get(method)
        if rpc is None:
            resp_type = getattr(self.sb, "Controller" + method + "Response")
            rpc = self.channel.unary_unary("/containerd.services.sandbox.v1.Controller/" + method,
                                           request_serializer=lambda m: m.SerializeToString(),
                                           response_deserializer=resp_type.FromString)
            self.rpcs[method] = rpc
        return rpc(req, timeout=timeout, metadata=self.md)

    def req(self, method, **kw):
        return getattr(self.sb, "Controller" + method + "Request")(**kw)

class TTRPCError(Exception):
    def __init__(self, code, message):
        super().__init__(f"code {code}: {message}")
        self.code, self.message = code, message

class TTRPC:
    """A blocking ttrpc client: one call at a time per instance."""
    def __init__(self, path, namespace="k8s.io"):
        from ttrpc import ttrpc_pb2
        self.pb = ttrpc_pb2
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.stream = 1
        self.namespace = namespace

    def _read(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("ttrpc peer closed the connection")
            buf += chunk
        return buf

    def call(self, service, method, req, resp_type, timeout_ns=0):
        r = self.pb.Request(service=service, method=method, payload=req.SerializeToString(), timeout_nano=timeout_ns)
        r.metadata.add(key="containerd-namespace-ttrpc", value=self.namespace)
        body = r.SerializeToString()
        sid = self.stream
        self.stream += 2
        self.s.sendall(struct.pack(">IIBB", len(body), sid, 1, 0) + body)
        while True:
            length, rsid, typ, _flags = struct.unpack(">IIBB", self._read(10))
            payload = self._read(length)
            if rsid == sid and typ == 2:
                break
        resp = self.pb.Response.FromString(payload)
        if resp.status.code != 0:
            raise TTRPCError(resp.status.code, resp.status.message)
        return resp_type.FromString(resp.payload)

    def close(self):
        self.s.close()

class Task:
    """containerd.task.v3.Task (the same messages as v2)."""
    def __init__(self, address):
        from containerd.task.v2 import shim_pb2
        self.t = shim_pb2
        path = address[len("ttrpc+unix://"):] if address.startswith("ttrpc+unix://") else address
        self.c = TTRPC(path)

    def call(self, method, req_name, resp_name, **kw):
        from google.protobuf import empty_pb2
        resp = getattr(self.t, resp_name) if resp_name != "Empty" else empty_pb2.Empty
        return self.c.call("containerd.task.v3.Task", method, getattr(self.t, req_name)(**kw), resp)

    def create(self, cid, bundle, stdout=""):
        return self.call("Create", "CreateTaskRequest", "CreateTaskResponse", id=cid, bundle=bundle, stdout=stdout)

    def start(self, cid, exec_id=""):
        return self.call("Start", "StartRequest", "StartResponse", id=cid, exec_id=exec_id)

    def state(self, cid, exec_id=""):
        return self.call("State", "StateRequest", "StateResponse", id=cid, exec_id=exec_id)

    def wait(self, cid, exec_id=""):
        return self.call("Wait", "WaitRequest", "WaitResponse", id=cid, exec_id=exec_id)

    def delete(self, cid, exec_id=""):
        return self.call("Delete", "DeleteRequest", "DeleteResponse", id=cid, exec_id=exec_id)

    def exec(self, cid, exec_id, args):
        import json
        from google.protobuf import any_pb2
        spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                           value=json.dumps({"args": args, "cwd": "/", "env": ["PATH=/bin:/usr/bin"],
                                             "user": {"uid": 0, "gid": 0}}).encode())
        return self.call("Exec", "ExecProcessRequest", "Empty", id=cid, exec_id=exec_id, spec=spec)

    def close(self):
        self.c.close()

def run_threads(n, body):
    """Runs body(i) in n threads at once; returns the exceptions raised, by index."""
    errors = {}
    barrier = threading.Barrier(n)
    def wrap(i):
        try:
            barrier.wait()
            body(i)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors[i] = e
    ts = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in ts: t.start()
    for t in ts: t.join()
    return errors
