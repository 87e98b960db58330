#!/usr/bin/env python3
"""HTTP (and memcached, FastCGI, SCGI, uwsgi, h2c) backends for ngx-consul's http tests:
one asyncio process, any number of loopback listeners. Python 3 standard library only.

  http_backend.py --control SOCKET [--parent PID] SPEC...

SPEC: PORT (127.0.0.1), ADDR:PORT, ranges 127.0.0.2-11:8090 and 127.0.0.1:8081-8084,
[::1]:PORT; a "memcached:", "fastcgi:", "scgi:", "uwsgi:" or "h2c:" prefix makes a
listener of that protocol (for memcached_pass, fastcgi_pass, scgi_pass, uwsgi_pass,
grpc_pass). Loopback addresses only.

HTTP listeners speak HTTP/1.1 with keep-alive (HTTP/1.0 only with "Connection:
keep-alive"), Content-Length framed. Every response says who answered:
  body      "<addr> <port> conn=<id> req=<n>\\n"   (id: process-wide connection number;
            n: the request's rank on its connection)
  headers   X-Backend: addr:port, X-Backend-Conn: id, X-Backend-Req: n
Query arguments: status=NNN answers with that status, sleep=MS waits first.
Request bodies (Content-Length or chunked) are read and dropped.

memcached listeners answer "get KEY" with "VALUE KEY 0 N\\r\\n<the same line>\\r\\nEND"
(a key starting with "missing" gets only END), "version", and close on "quit".

fastcgi, scgi, uwsgi and h2c listeners answer every request with status 200 and the
body above (text/plain), whatever it asks for, the request's body read and dropped:
  fastcgi   records (FCGI_BEGIN_REQUEST .. empty FCGI_STDIN) -> FCGI_STDOUT "Status: 200"
            + body, empty FCGI_STDOUT, FCGI_END_REQUEST; the connection stays open when
            nginx asked for it (FCGI_KEEP_CONN: fastcgi_keep_conn on), else it closes
  scgi      netstring headers + CONTENT_LENGTH body -> "Status: 200 OK" + body, close
  uwsgi     4-byte header + vars + CONTENT_LENGTH body -> "HTTP/1.1 200 OK" + body, close
  h2c       HTTP/2 with prior knowledge (grpc_pass): a HEADERS (+ DATA) stream ending in
            END_STREAM -> HEADERS ":status 200" + DATA with END_STREAM; SETTINGS and PING
            acknowledged; any number of streams, one at a time or interleaved
"requests" counts requests (streams for h2c), "accepted" connections.

The control socket (unix, stream) takes one command per line and answers one JSON line:
  stats                per listener "addr:port": {kind, listening, accepted, requests,
                       open, held, slow_ms}
  reset                zero the counters, clear slow/hold, re-open killed listeners and
                       reset every open connection
  kill ADDR:PORT       close the listener and reset (RST) its connections
  start [KIND:]ADDR:PORT   listen again (or anew)
  slow ADDR:PORT MS    delay its responses by MS (0: no delay)
  hold ADDR:PORT       keep its requests waiting (counted as "held") until release
  release [ADDR:PORT]  answer the held requests (of one listener, or all)
  quit                 exit
Every listener is bound before the control socket exists: the process is ready when the
control socket answers. It exits on SIGTERM/SIGINT, on "quit", and when its parent
(--parent, by default the process that started it) is gone, so that a test that dies
leaves nothing behind.
"""

import argparse
import asyncio
import ctypes
import json
import os
import re
import signal
import socket
import struct
import sys
import urllib.parse

STATUS_TEXT = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
               500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
               504: "Gateway Timeout"}
MAX_HEAD = 64 * 1024
KINDS = ("http", "memcached", "fastcgi", "scgi", "uwsgi", "h2c")


def expand(spec):
    """SPEC -> [(kind, addr, port)]."""
    kind = "http"
    m = re.fullmatch(r"(%s):(.+)" % "|".join(k for k in KINDS if k != "http"), spec)
    if m:
        kind, spec = m.group(1), m.group(2)
    if re.fullmatch(r"\d+", spec):
        spec = "127.0.0.1:" + spec
    m = re.fullmatch(r"\[([0-9a-fA-F:]+)\]:(\d+)(?:-(\d+))?", spec)
    if m:
        addrs, p0, p1 = [m.group(1)], int(m.group(2)), int(m.group(3) or m.group(2))
    else:
        m = re.fullmatch(r"(\d+\.\d+\.\d+)\.(\d+)(?:-(\d+))?:(\d+)(?:-(\d+))?", spec)
        if not m:
            raise SystemExit(f"http_backend: bad listener \"{spec}\"")
        net, a0, a1 = m.group(1), int(m.group(2)), int(m.group(3) or m.group(2))
        addrs = [f"{net}.{i}" for i in range(a0, a1 + 1)]
        p0, p1 = int(m.group(4)), int(m.group(5) or m.group(4))
    out = []
    for a in addrs:
        if not (a.startswith("127.") or a == "::1"):
            raise SystemExit(f"http_backend: {a}: loopback addresses only")
        out += [(kind, a, p) for p in range(p0, p1 + 1)]
    return out


def key_of(addr, port):
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def normalize(ap):
    """"8081" or "127.0.0.1:8081" or "[::1]:8081" -> the listener key."""
    (_, a, p), = expand(ap)
    return key_of(a, p)


class Listener:
    def __init__(self, kind, addr, port):
        self.kind, self.addr, self.port = kind, addr, port
        self.key = key_of(addr, port)
        self.server = None
        self.conns = set()      # StreamWriters of open connections
        self.slow_ms = 0
        self.hold = False
        self.held = []          # futures of waiting requests
        self.reset_counters()

    def reset_counters(self):
        self.accepted = 0
        self.requests = 0

    def stats(self):
        return {"kind": self.kind, "listening": self.server is not None,
                "accepted": self.accepted, "requests": self.requests,
                "open": len(self.conns), "held": len(self.held), "slow_ms": self.slow_ms}


class Backends:
    def __init__(self):
        self.listeners = {}
        self.next_conn = 0
        self.done = asyncio.Event()

    async def listen(self, lst):
        family = socket.AF_INET6 if ":" in lst.addr else socket.AF_INET
        lst.server = await asyncio.start_server(
            lambda r, w: self.serve(lst, r, w), lst.addr, lst.port, family=family,
            reuse_address=True, backlog=1024)

    async def add(self, kind, addr, port):
        key = key_of(addr, port)
        lst = self.listeners.get(key)
        if lst is None:
            lst = self.listeners[key] = Listener(kind, addr, port)
        if lst.server is None:
            await self.listen(lst)
        return lst

    @staticmethod
    def reset_conn(w):
        """Close with RST (SO_LINGER 0), as a crashed or killed server would."""
        sock = w.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        w.transport.abort()

    def release(self, lst):
        for f in lst.held:
            if not f.done():
                f.set_result(None)
        lst.held.clear()

    async def kill(self, lst):
        if lst.server is not None:
            lst.server.close()
            lst.server = None
        self.release(lst)
        for w in list(lst.conns):
            self.reset_conn(w)
        lst.conns.clear()

    # ----------------------------------------------------------------- serving

    async def serve(self, lst, reader, writer):
        self.next_conn += 1
        conn_id = self.next_conn
        lst.accepted += 1
        lst.conns.add(writer)
        try:
            await getattr(self, "serve_" + lst.kind)(lst, conn_id, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, OSError, asyncio.CancelledError):
            pass  # cancelled: the process is exiting
        finally:
            lst.conns.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    async def delay(self, lst):
        if lst.hold:
            f = asyncio.get_running_loop().create_future()
            lst.held.append(f)
            try:
                await f
            finally:
                if f in lst.held:
                    lst.held.remove(f)
        if lst.slow_ms:
            await asyncio.sleep(lst.slow_ms / 1000)

    async def serve_http(self, lst, conn_id, reader, writer):
        n = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            method, target, version = parts
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            await self.drop_body(reader, headers)
            n += 1
            lst.requests += 1
            conn_hdr = headers.get("connection", "").lower()
            keep = ("close" not in conn_hdr) if version == "HTTP/1.1" else ("keep-alive" in conn_hdr)
            q = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
            status = int(q.get("status", ["200"])[0])
            sleep_ms = int(q.get("sleep", ["0"])[0])
            await self.delay(lst)
            if sleep_ms:
                await asyncio.sleep(sleep_ms / 1000)
            if lst.server is None:  # killed while the request waited
                return
            body = f"{lst.addr} {lst.port} conn={conn_id} req={n}\n".encode()
            out = (f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Status')}\r\n"
                   f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                   f"X-Backend: {lst.key}\r\nX-Backend-Conn: {conn_id}\r\nX-Backend-Req: {n}\r\n"
                   f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode()
            writer.write(out if method == "HEAD" else out + body)
            await writer.drain()
            if not keep:
                return

    @staticmethod
    async def drop_body(reader, headers):
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    return
                await reader.readexactly(size + 2)
        length = int(headers.get("content-length", "0") or 0)
        if length:
            await reader.readexactly(length)

    async def serve_memcached(self, lst, conn_id, reader, writer):
        n = 0
        while True:
            line = await reader.readline()
            if not line:
                return
            words = line.decode("latin-1").split()
            if not words:
                continue
            cmd = words[0].lower()
            if cmd == "quit":
                return
            if cmd == "version":
                writer.write(b"VERSION 1.6.0-test\r\n")
            elif cmd in ("get", "gets") and len(words) > 1:
                n += 1
                lst.requests += 1
                await self.delay(lst)
                if lst.server is None:
                    return
                key = words[1]
                if key.startswith("missing"):
                    writer.write(b"END\r\n")
                else:
                    data = f"{lst.addr} {lst.port} conn={conn_id} req={n}\n".encode()
                    writer.write(f"VALUE {key} 0 {len(data)}\r\n".encode() + data + b"\r\nEND\r\n")
            else:
                writer.write(b"ERROR\r\n")
            await writer.drain()

    @staticmethod
    def who(lst, conn_id, n):
        """The body every listener answers with: who answered, on which connection."""
        return f"{lst.addr} {lst.port} conn={conn_id} req={n}\n".encode()

    async def answer(self, lst, conn_id, n):
        """Counts a request, waits as slow/hold say; the body, or None when killed meanwhile."""
        lst.requests += 1
        await self.delay(lst)
        return None if lst.server is None else self.who(lst, conn_id, n)

    async def serve_fastcgi(self, lst, conn_id, reader, writer):
        n, keep = 0, False
        while True:
            try:
                head = await reader.readexactly(8)
            except asyncio.IncompleteReadError:
                return
            _, rtype, req_id, clen, plen = struct.unpack(">BBHHB", head[:7])
            content = await reader.readexactly(clen + plen)
            if rtype == 1:                          # FCGI_BEGIN_REQUEST: role, flags
                keep = bool(content[2] & 1)         # FCGI_KEEP_CONN
            elif rtype == 5 and clen == 0:          # the empty FCGI_STDIN: request complete
                n += 1
                body = await self.answer(lst, conn_id, n)
                if body is None:
                    return
                out = b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body

                def record(t, data):
                    return struct.pack(">BBHHBx", 1, t, req_id, len(data), 0) + data
                writer.write(record(6, out) + record(6, b"")
                             + record(3, struct.pack(">IB3x", 0, 0)))   # FCGI_END_REQUEST
                await writer.drain()
                if not keep:
                    return
            # FCGI_PARAMS and the rest of FCGI_STDIN: read and dropped

    async def serve_scgi(self, lst, conn_id, reader, writer):
        size = int((await reader.readuntil(b":"))[:-1])
        netstring = await reader.readexactly(size + 1)          # headers and ","
        fields = netstring[:-1].split(b"\0")
        headers = dict(zip(fields[0::2], fields[1::2]))
        await reader.readexactly(int(headers.get(b"CONTENT_LENGTH", b"0") or 0))
        body = await self.answer(lst, conn_id, 1)
        if body is not None:
            writer.write(b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
            await writer.drain()

    async def serve_uwsgi(self, lst, conn_id, reader, writer):
        _, size, _ = struct.unpack("<BHB", await reader.readexactly(4))
        data, i, env = await reader.readexactly(size), 0, {}
        while i + 2 <= len(data):                   # u16 key length, key, u16 value length, value
            kl = struct.unpack_from("<H", data, i)[0]
            key = data[i + 2:i + 2 + kl]
            vl = struct.unpack_from("<H", data, i + 2 + kl)[0]
            env[key] = data[i + 4 + kl:i + 4 + kl + vl]
            i += 4 + kl + vl
        await reader.readexactly(int(env.get(b"CONTENT_LENGTH", b"0") or 0))
        body = await self.answer(lst, conn_id, 1)
        if body is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
            await writer.drain()

    async def serve_h2c(self, lst, conn_id, reader, writer):
        if await reader.readexactly(24) != b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n":
            return

        def frame(ftype, flags, stream, payload=b""):
            return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", ftype, flags, stream) + payload
        writer.write(frame(4, 0, 0))                # our SETTINGS: the defaults
        n, open_streams = 0, set()
        while True:
            try:
                head = await reader.readexactly(9)
            except asyncio.IncompleteReadError:
                return
            length = struct.unpack(">I", b"\0" + head[:3])[0]
            ftype, flags, stream = head[3], head[4], struct.unpack(">I", head[5:])[0] & 0x7FFFFFFF
            payload = await reader.readexactly(length)
            if ftype == 4 and not flags & 1:        # SETTINGS -> ACK
                writer.write(frame(4, 1, 0))
            elif ftype == 6 and not flags & 1:      # PING -> ACK
                writer.write(frame(6, 1, 0, payload))
            elif ftype == 7:                        # GOAWAY
                return
            elif ftype == 3:                        # RST_STREAM
                open_streams.discard(stream)
            elif ftype in (0, 1):                   # DATA, HEADERS (HPACK not decoded: not needed)
                open_streams.add(stream)
                if flags & 1 and stream in open_streams:    # END_STREAM: the request is complete
                    open_streams.discard(stream)
                    n += 1
                    body = await self.answer(lst, conn_id, n)
                    if body is None:
                        return
                    writer.write(frame(1, 4, stream, b"\x88")      # END_HEADERS, ":status: 200"
                                 + frame(0, 1, stream, body))       # END_STREAM
            await writer.drain()

    # ----------------------------------------------------------------- control

    async def control(self, reader, writer):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    answer = await self.command(line.decode().split())
                except (KeyError, ValueError, OSError, SystemExit) as e:
                    answer = {"ok": False, "error": str(e)}
                writer.write((json.dumps(answer, sort_keys=True) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass  # cancelled: the process is exiting
        finally:
            writer.close()

    def find(self, ap):
        key = normalize(ap)
        if key not in self.listeners:
            raise KeyError(f"no listener {key}")
        return self.listeners[key]

    async def command(self, w):
        if not w:
            return {"ok": False, "error": "empty command"}
        cmd = w[0]
        if cmd == "stats":
            return {k: v.stats() for k, v in self.listeners.items()}
        if cmd == "reset":
            for lst in self.listeners.values():
                lst.slow_ms, lst.hold = 0, False
                await self.kill(lst)
                await self.listen(lst)
                lst.reset_counters()
            return {"ok": True}
        if cmd == "kill" and len(w) == 2:
            await self.kill(self.find(w[1]))
            return {"ok": True}
        if cmd == "start" and len(w) == 2:
            for kind, a, p in expand(w[1]):
                await self.add(kind, a, p)
            return {"ok": True}
        if cmd == "slow" and len(w) == 3:
            self.find(w[1]).slow_ms = int(w[2])
            return {"ok": True}
        if cmd == "hold" and len(w) == 2:
            self.find(w[1]).hold = True
            return {"ok": True}
        if cmd == "release" and len(w) <= 2:
            for lst in ([self.find(w[1])] if len(w) == 2 else self.listeners.values()):
                lst.hold = False
                self.release(lst)
            return {"ok": True}
        if cmd == "quit":
            self.done.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command: {' '.join(w)}"}


def die_with_parent(parent):
    """SIGTERM when the parent exits (Linux), besides the polling in watch_parent()."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent went before prctl
        os.kill(os.getpid(), signal.SIGTERM)


async def watch_parent(parent, done):
    while not done.is_set():
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            done.set()
            return
        except PermissionError:
            pass
        await asyncio.sleep(0.5)


async def main():
    ap = argparse.ArgumentParser(description="HTTP/memcached/FastCGI/SCGI/uwsgi/h2c test backends")
    ap.add_argument("--control", required=True, help="unix socket path for the control commands")
    ap.add_argument("--parent", type=int, default=os.getppid(), help="exit when this pid is gone")
    ap.add_argument("specs", nargs="*")
    args = ap.parse_args()
    if args.parent == os.getppid():
        die_with_parent(args.parent)

    b = Backends()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, b.done.set)
    for spec in args.specs:
        for kind, addr, port in expand(spec):
            try:
                await b.add(kind, addr, port)
            except OSError as e:
                print(f"http_backend: cannot listen on {key_of(addr, port)}: {e}", file=sys.stderr)
                return 1
    try:
        os.unlink(args.control)
    except FileNotFoundError:
        pass
    ctl = await asyncio.start_unix_server(b.control, path=args.control)
    print(f"http_backend: ready, {len(b.listeners)} listeners", file=sys.stderr, flush=True)
    watcher = asyncio.create_task(watch_parent(args.parent, b.done))
    await b.done.wait()
    watcher.cancel()
    ctl.close()
    for lst in b.listeners.values():
        await b.kill(lst)
    try:
        os.unlink(args.control)
    except FileNotFoundError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
