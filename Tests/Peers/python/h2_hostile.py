"""Hostile HTTP/2 input against our server, frame by frame (python3-h2's hpack for
well-formed header blocks, raw bytes for the rest).

usage: h2_hostile.py SOCKET CASE — prints what the server answered:
  goaway=<error code>  rst=<code>:<count>  closed=<bool>
"""
import socket
import struct
import sys
import time

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(ftype, flags, stream, payload=b""):
    n = len(payload)
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, ftype, flags, stream) + payload


def request_block(path="/test.Echo/Echo"):
    return hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                   (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")])


def hpack_int(value, prefix_bits, first):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


sock_path, case = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock_path)
start = PREFACE + frame(SETTINGS, 0, 0)


def send(b):
    try:
        s.sendall(b)
    except (BrokenPipeError, ConnectionResetError):
        pass


if case == "bad_preface":
    send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 16)
elif case == "no_settings_first":
    send(PREFACE + frame(PING, 0, 0, b"12345678"))
elif case == "oversized_frame":
    send(start + frame(DATA, 0, 1, b"\0" * 20000))
elif case == "header_block_flood":
    send(start + frame(HEADERS, 0, 1, request_block()))
    for _ in range(100):
        send(frame(CONT, 0, 1, b"\x40\x01a\x01b" * 200))
elif case == "hpack_bomb":
    big = b"v" * 4000
    block = b"\x40" + hpack_int(6, 7, 0) + b"x-bomb" + hpack_int(len(big), 7, 0) + big
    block += bytes([0x80 | 62]) * 10  # ten references to it: 40 KB of headers from 4 KB
    send(start + frame(HEADERS, END_HEADERS, 1, request_block() + block))
elif case == "bad_hpack":
    send(start + frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff"))
elif case == "window_overflow":
    send(start + frame(WINDOW, 0, 0, struct.pack(">I", 0x7FFFFFFF)))
elif case == "stream_reuse":
    send(start + frame(HEADERS, END_HEADERS, 3, request_block()) + frame(HEADERS, END_HEADERS, 1, request_block()))
elif case == "even_stream":
    send(start + frame(HEADERS, END_HEADERS, 2, request_block()))
elif case == "rst_flood":
    send(start + frame(HEADERS, END_HEADERS, 1, request_block()))
    send(b"".join(frame(RST, 0, 1, struct.pack(">I", 8)) for _ in range(2000)))
elif case == "settings_flood":
    send(start + b"".join(frame(SETTINGS, 0, 0) for _ in range(2000)))
elif case == "ping_flood":
    send(start + b"".join(frame(PING, 0, 0, b"abcdefgh") for _ in range(2000)))
elif case == "refused_streams":
    enc = hpack.Encoder()
    hdrs = [(":method", "POST"), (":scheme", "http"), (":path", "/test.Echo/Echo"),
            (":authority", "localhost"), ("content-type", "application/grpc")]
    send(start + b"".join(frame(HEADERS, END_HEADERS, 2 * i + 1, enc.encode(hdrs)) for i in range(1030)))
else:
    print("unknown case", case)
    sys.exit(2)

# Read what the server says until it closes or goes quiet.
s.settimeout(2.0)
buf = b""
closed = False
deadline = time.time() + 5
while time.time() < deadline:
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        break
    except ConnectionResetError:
        closed = True
        break
    if not chunk:
        closed = True
        break
    buf += chunk

goaway, rsts = None, {}
i = 0
while i + 9 <= len(buf):
    n = (buf[i] << 16) | (buf[i + 1] << 8) | buf[i + 2]
    ftype, stream = buf[i + 3], struct.unpack(">I", buf[i + 5:i + 9])[0] & 0x7FFFFFFF
    payload = buf[i + 9:i + 9 + n]
    if ftype == GOAWAY and len(payload) >= 8:
        goaway = struct.unpack(">I", payload[4:8])[0]
    elif ftype == RST and len(payload) == 4:
        code = struct.unpack(">I", payload)[0]
        rsts[code] = rsts.get(code, 0) + 1
    i += 9 + n
parts = []
if goaway is not None:
    parts.append("goaway=%d" % goaway)
for code, count in sorted(rsts.items()):
    parts.append("rst=%d:%d" % (code, count))
parts.append("closed=%s" % closed)
print(" ".join(parts))
