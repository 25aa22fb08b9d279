#!/usr/bin/python3
"""Plays containerd's events service for the daemon: a ttrpc server on SOCKET answering
containerd.services.events.ttrpc.v1.Events/Forward (frames written from the format:
10-byte header, ttrpc.Request in, ttrpc.Response out). Prints one line per event,
`<topic> <namespace> <container id>`, and exits on SIGTERM.
Usage: events_sink.py STUBS_DIR SOCKET"""
import os, socket, struct, sys, threading
sys.path.insert(0, sys.argv[1])
from ttrpc import ttrpc_pb2
from containerd.services.events import ttrpc_events_pb2
from containerd.events import task_pb2

path = sys.argv[2]
try:
    os.unlink(path)
except FileNotFoundError:
    pass
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(16)
lock = threading.Lock()
print("listening", flush=True)

def read_exact(c, n):
    buf = b""
    while len(buf) < n:
        chunk = c.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf

def serve(c):
    while True:
        head = read_exact(c, 10)
        if head is None:
            return
        length, sid, typ, _flags = struct.unpack(">IIBB", head)
        body = read_exact(c, length)
        if body is None or typ != 1:
            return
        req = ttrpc_pb2.Request.FromString(body)
        resp = ttrpc_pb2.Response()
        if req.service == "containerd.services.events.ttrpc.v1.Events" and req.method == "Forward":
            env = ttrpc_events_pb2.ForwardRequest.FromString(req.payload).envelope
            cid = ""
            name = env.event.type_url.split("/")[-1]
            if name.startswith("containerd.events."):
                msg = getattr(task_pb2, name[len("containerd.events."):])()
                msg.ParseFromString(env.event.value)
                cid = msg.container_id
            with lock:
                print(f"{env.topic} {env.namespace} {cid}", flush=True)
        else:
            resp.status.code = 12
            resp.status.message = f"unknown {req.service}/{req.method}"
        out = resp.SerializeToString()
        c.sendall(struct.pack(">IIBB", len(out), sid, 2, 0) + out)

while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
