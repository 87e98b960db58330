#!/usr/bin/env python3
"""HTTP (and memcached) backends for ngx-consul's http tests: one asyncio process,
any number of loopback listeners. Python 3 standard library only.

  http_backend.py --control SOCKET [--parent PID] SPEC...

SPEC: PORT (127.0.0.1), ADDR:PORT, ranges 127.0.0.2-11:8090 and 127.0.0.1:8081-8084,
[::1]:PORT; a "memcached:" prefix makes a memcached listener. Loopback addresses only.

HTTP listeners speak HTTP/1.1 with keep-alive (HTTP/1.0 only with "Connection:
keep-alive"), Content-Length framed. Every response says who answered:
  body      "<addr> <port> conn=<id> req=<n>\\n"   (id: process-wide connection number;
            n: the request's rank on its connection)
  headers   X-Backend: addr:port, X-Backend-Conn: id, X-Backend-Req: n
Query arguments: status=NNN answers with that status, sleep=MS waits first.
Request bodies (Content-Length or chunked) are read and dropped.

memcached listeners answer "get KEY" with "VALUE KEY 0 N\\r\\n<the same line>\\r\\nEND"
(a key starting with "missing" gets only END), "version", and close on "quit".

The control socket (unix, stream) takes one command per line and answers one JSON line:
  stats                per listener "addr:port": {kind, listening, accepted, requests,
                       open, held, slow_ms}
  reset                zero the counters, clear slow/hold, re-open killed listeners and
                       reset every open connection
  kill ADDR:PORT       close the listener and reset (RST) its connections
  start [memcached:]ADDR:PORT   listen again (or anew)
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


def expand(spec):
    """SPEC -> [(kind, addr, port)]."""
    kind = "http"
    if spec.startswith("memcached:"):
        kind, spec = "memcached", spec[len("memcached:"):]
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
            if lst.kind == "memcached":
                await self.serve_memcached(lst, conn_id, reader, writer)
            else:
                await self.serve_http(lst, conn_id, reader, writer)
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
    ap = argparse.ArgumentParser(description="HTTP/memcached test backends")
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
