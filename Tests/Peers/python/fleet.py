#!/usr/bin/python3
"""Many sandboxes at once through kuasar's sandbox Controller (grpcio) and Task API
(ttrpc), as containerd 2.x drives them. Usage:
  fleet.py STUBS SOCKET up PREFIX N TEMPLATE_BUNDLE WORKDIR [--hostile]
      create+start N sandboxes in parallel, one container each (its own bundle under
      WORKDIR; container i runs a shell that exits 10+i on SIGUSR1); prints
      `ready <sandbox> <pid>` per sandbox. --hostile: hostile HTTP/2 clients hammer the
      socket meanwhile.
  fleet.py STUBS SOCKET check PREFIX N EXITED
      after a daemon restart: every sandbox is READY; EXITED (`i:code,...`) containers
      report STOPPED with that status (State and Wait); the others run, take an exec,
      and stop (Controller Stop) with the SIGKILL status.
  fleet.py STUBS SOCKET exec PREFIX I EXEC_ID
      starts an exec in sandbox I's container that exits 21 on SIGUSR1; prints `exec <pid>`.
  fleet.py STUBS SOCKET check PREFIX N EXITED EXECS
      EXECS (`i:exec_id:running|code,...`): an exec still running after the restart is
      stopped through Kill (SIGUSR1) and waited (21); one that ended while no daemon ran
      reports STOPPED with its code.
  fleet.py STUBS SOCKET down PREFIX N
      shuts every sandbox down in parallel; each is NotFound afterwards.
Exits non-zero naming the first failed check."""
import json, os, socket, struct, sys, threading, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kuasar_peer as kp

stubs, sock, cmd, prefix, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
kp.load_stubs(stubs)
import grpc
ctl = kp.Controller(sock)
STOPPED, RUNNING = 3, 2  # containerd.v1.types.Status

def fail(msg):
    print("FAIL " + msg, flush=True)
    sys.exit(1)

def sid(i):
    return f"{prefix}{i}"

def cid(i):
    return f"{prefix}{i}-c"  # container ids are unique in a containerd namespace

def hostile(stop):
    """Clients a server must survive: a frame far over the size limit, garbage after the
    preface, a frame cut off by a vanishing peer, a call abandoned mid-Wait."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings = struct.pack(">I", 0)[1:] + bytes([4, 0]) + struct.pack(">I", 0)
    shapes = [
        preface + settings + struct.pack(">I", 0xFFFFFF)[1:] + bytes([0, 0]) + struct.pack(">I", 1) + b"x" * 100,
        preface + os.urandom(512),
        preface + settings + struct.pack(">I", 200)[1:] + bytes([1, 4]) + struct.pack(">I", 1) + b"\xff" * 20,
    ]
    k = 0
    while not stop.is_set():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(sock)
            s.sendall(shapes[k % len(shapes)])
            s.settimeout(0.2)
            try:
                s.recv(4096)
            except OSError:
                pass
        except OSError:
            pass
        finally:
            s.close()
        try:
            ctl.call("Wait", ctl.req("Wait", sandbox_id=sid(0), sandboxer="kuasar"), timeout=0.02)
        except grpc.RpcError:
            pass
        k += 1
    print(f"hostile clients: {k} rounds", flush=True)

def up(template, workdir, with_hostile):
    spec = json.load(open(os.path.join(template, "config.json")))
    rootfs = spec["root"]["path"]
    if not rootfs.startswith("/"):
        rootfs = os.path.join(template, rootfs)
    stop = threading.Event()
    h = threading.Thread(target=hostile, args=(stop,))
    if with_hostile:
        h.start()
    pids = {}
    def one(i):
        bundle = os.path.join(workdir, sid(i))
        os.makedirs(bundle, exist_ok=True)
        s = dict(spec)
        s["root"] = {"path": rootfs, "readonly": True}
        s["process"] = dict(spec["process"], terminal=False,
                            args=["sh", "-c", f'trap "exit {10 + i}" USR1; while :; do sleep 0.05; done'])
        json.dump(s, open(os.path.join(bundle, "config.json"), "w"))
        ctl.call("Create", ctl.req("Create", sandbox_id=sid(i), sandboxer="kuasar"))
        r = ctl.call("Start", ctl.req("Start", sandbox_id=sid(i), sandboxer="kuasar"))
        if r.version != 3 or not r.address.startswith("ttrpc+unix://"):
            raise AssertionError(f"{sid(i)}: start answered {r}")
        t = kp.Task(r.address)
        c = t.create(cid(i), bundle)
        t.start(cid(i))
        if t.state(cid(i)).status != RUNNING:
            raise AssertionError(f"{sid(i)}: container not running")
        t.close()
        pids[i] = c.pid
    t0 = time.time()
    errors = kp.run_threads(n, one)
    took = time.time() - t0
    stop.set()
    if with_hostile:
        h.join()
    if errors:
        fail(f"{len(errors)} of {n} sandboxes failed; first: {sid(min(errors))}: {errors[min(errors)]!r}")
    for i in range(n):
        st = ctl.call("Status", ctl.req("Status", sandbox_id=sid(i), sandboxer="kuasar"))
        if st.state != "SANDBOX_READY":
            fail(f"{sid(i)}: {st.state}")
        print(f"ready {sid(i)} {pids[i]}", flush=True)
    print(f"up {n} in {took:.3f}s", flush=True)

def start_exec(i, exec_id):
    st = ctl.call("Status", ctl.req("Status", sandbox_id=sid(i), sandboxer="kuasar"))
    t = kp.Task(st.address)
    t.exec(cid(i), exec_id, ["sh", "-c", 'trap "exit 21" USR1; while :; do sleep 0.05; done'])
    r = t.start(cid(i), exec_id)
    print(f"exec {r.pid}", flush=True)
    t.close()

def check(exited, execs):
    expected = {int(a): int(b) for a, b in (x.split(":") for x in exited.split(",") if x)}
    exec_checks = {}
    for x in execs.split(","):
        if x:
            i, eid, what = x.split(":")
            exec_checks.setdefault(int(i), []).append((eid, what))
    for i in range(n):
        st = ctl.call("Status", ctl.req("Status", sandbox_id=sid(i), sandboxer="kuasar", verbose=True))
        if st.state != "SANDBOX_READY" or st.version != 3:
            fail(f"{sid(i)} after restart: {st.state} version {st.version}")
        t = kp.Task(st.address)
        for eid, what in exec_checks.get(i, []):
            es = t.state(cid(i), eid)
            if what == "running":
                if es.status != RUNNING:
                    fail(f"{sid(i)} exec {eid}: want RUNNING after restart, got {es.status}")
                t.call("Kill", "KillRequest", "Empty", id=cid(i), exec_id=eid, signal=10)
                w = t.wait(cid(i), eid)
                if w.exit_status != 21:
                    fail(f"{sid(i)} exec {eid}: stopped with {w.exit_status}, want 21")
                print(f"exec {sid(i)} {eid} recovered running, killed 21", flush=True)
            else:
                w = t.wait(cid(i), eid)
                if es.status != STOPPED or es.exit_status != int(what) or w.exit_status != int(what):
                    fail(f"{sid(i)} exec {eid}: want STOPPED {what}, got {es.status} {es.exit_status} (wait {w.exit_status})")
                print(f"exec {sid(i)} {eid} exited while down {w.exit_status}", flush=True)
            t.delete(cid(i), eid)
        state = t.state(cid(i))
        if i in expected:
            if state.status != STOPPED or state.exit_status != expected[i]:
                fail(f"{sid(i)}: exited while the daemon was down: want STOPPED {expected[i]}, got {state.status} {state.exit_status}")
            w = t.wait(cid(i))
            if w.exit_status != expected[i] or w.exited_at.seconds == 0:
                fail(f"{sid(i)}: wait answered {w.exit_status}, want {expected[i]}")
            print(f"exited {sid(i)} {w.exit_status}", flush=True)
        else:
            if state.status != RUNNING:
                fail(f"{sid(i)}: want RUNNING after restart, got {state.status}")
            t.exec(cid(i), "e1", ["sh", "-c", "exit 5"])
            t.start(cid(i), "e1")
            w = t.wait(cid(i), "e1")
            if w.exit_status != 5:
                fail(f"{sid(i)}: exec after restart exited {w.exit_status}, want 5")
            t.delete(cid(i), "e1")
            ctl.call("Stop", ctl.req("Stop", sandbox_id=sid(i), sandboxer="kuasar", timeout_secs=0))
            ctl.call("Wait", ctl.req("Wait", sandbox_id=sid(i), sandboxer="kuasar"))
            w = t.wait(cid(i))
            if w.exit_status != 137:
                fail(f"{sid(i)}: stopped container exited {w.exit_status}, want 137")
            print(f"running {sid(i)} exec 5 stop 137", flush=True)
        t.close()

def down():
    def one(i):
        ctl.call("Shutdown", ctl.req("Shutdown", sandbox_id=sid(i), sandboxer="kuasar"))
        try:
            ctl.call("Status", ctl.req("Status", sandbox_id=sid(i), sandboxer="kuasar"))
            raise AssertionError(f"{sid(i)}: still there after Shutdown")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
    errors = kp.run_threads(n, one)
    if errors:
        fail(f"shutdown: {len(errors)} failed; first {sid(min(errors))}: {errors[min(errors)]!r}")
    print(f"down {n}", flush=True)

if cmd == "up":
    up(sys.argv[6], sys.argv[7], "--hostile" in sys.argv)
elif cmd == "check":
    check(sys.argv[6] if len(sys.argv) > 6 else "", sys.argv[7] if len(sys.argv) > 7 else "")
elif cmd == "exec":
    start_exec(n, sys.argv[6])
elif cmd == "down":
    down()
else:
    fail("unknown command " + cmd)
