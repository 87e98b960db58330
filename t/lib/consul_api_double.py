#!/usr/bin/env python3
"""A stand-in for a Consul agent's HTTP API, for ngx-consul's tests and benchmarks.

Written from Consul's documented API (the catalog and health endpoints, the
"Blocking Queries" page) and the shapes of its api/health.go structures
(ServiceEntry: Node, Service, Checks). Python 3 standard library only.

  consul_api_double.py --port 8500 --control-port 18500 [--tls CERT KEY]
                       [--init STATE.json] [--log REQUESTS.jsonl] [--dc yunlu_office]

The agent's port serves (HTTP/1.1, keep-alive):
  GET  /v1/health/service/NAME   ?dc= &tag= (repeatable, all required) &passing
                                 &filter= &index= &wait= ; X-Consul-Token or
                                 Authorization: Bearer; blocking as Consul does
  PUT  /v1/catalog/register      Consul's RegisterRequest JSON (Node, Address,
                                 Service{...}, Check / Checks)
  PUT  /v1/catalog/deregister    {"Node", "ServiceID"} or {"Node", "CheckID"} or {"Node"}
  GET  /v1/status/leader

The control port (plain HTTP, no token) drives the double:
  PUT  /mode      {"mode": NAME, ...}: how the next health answers misbehave
  PUT  /acl       {"enabled": bool, "tokens": {TOKEN: [SERVICE, ...] or ["*"]},
                   "anonymous": [SERVICE, ...]}
  PUT  /index     {"service": NAME, "index": N}: move a service's index (back, too)
  PUT  /register, /deregister   as the catalog endpoints (no ACL)
  PUT  /check     {"Node", "CheckID", "Status"}: a check's state
  GET  /requests  every health request so far, as JSON lines
  GET  /state     the catalog

Modes (health answers only; "count": N limits a mode to N answers, then "ok"):
  ok, no_leader (500 "No cluster leader"), permission_denied (403), acl_not_found (403),
  silent (never answers; the connection stays open), close (closes at once),
  truncated (Content-Length, half the body, close), close_mid_body (chunked,
  half, close), malformed, wrong_types, object, huge ("bytes": N, chunked),
  huge_length (announces "bytes" in Content-Length), drip ("delay": seconds
  per byte), gzip (Content-Encoding: gzip), index_zero, no_index, http10 (no
  length, close), bad_chunk, slow_head ("delay" before the head),
  drop_keepalive (answers, then closes the connection without saying so).
"""

import argparse
import json
import random
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Condition()
STATE = {
    "index": 10,             # raft index: moves with every write
    "nodes": {},             # name -> {"Address", "Datacenter", "TaggedAddresses", "Meta"}
    "services": {},          # (node, id) -> AgentService
    "checks": {},            # (node, check id) -> HealthCheck
    "service_index": {},     # service name -> index of its last change
    "node_services": {},     # node -> {service id: service name}
    "mode": {"mode": "ok"},
    "acl": {"enabled": False, "tokens": {}, "anonymous": []},
}
REQUESTS = []
ARGS = None
CONN_IDS = iter(range(1, 1 << 62))


def bump(services):
    """A write: the raft index moves; these services' index with it."""
    STATE["index"] += 1
    for s in services:
        STATE["service_index"][s] = STATE["index"]
    LOCK.notify_all()


def services_of_node(node):
    return set(STATE["node_services"].get(node, {}).values())


def register(req):
    node = req.get("Node") or "node1"
    affected = set()
    old = STATE["nodes"].get(node)
    addr = req.get("Address", old["Address"] if old else "")
    STATE["nodes"][node] = {
        "ID": req.get("ID", ""),
        "Node": node,
        "Address": addr,
        "Datacenter": req.get("Datacenter") or ARGS.dc,
        "TaggedAddresses": req.get("TaggedAddresses") or {"lan": addr, "wan": addr},
        "Meta": req.get("NodeMeta") or {"consul-network-segment": ""},
    }
    if old and old["Address"] != addr:
        affected |= services_of_node(node)
    svc = req.get("Service")
    if svc:
        sid = svc.get("ID") or svc["Service"]
        weights = svc.get("Weights") or {"Passing": 1, "Warning": 1}
        STATE["services"][(node, sid)] = {
            "ID": sid,
            "Service": svc["Service"],
            "Tags": svc.get("Tags") or [],
            "Address": svc.get("Address", ""),
            "TaggedAddresses": svc.get("TaggedAddresses") or {},
            "Meta": svc.get("Meta") or {},
            "Port": svc.get("Port", 0),
            "Weights": weights,
            "EnableTagOverride": False,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "PeerName": "",
            "CreateIndex": STATE["index"] + 1,
            "ModifyIndex": STATE["index"] + 1,
        }
        affected.add(svc["Service"])
        STATE["node_services"].setdefault(node, {})[sid] = svc["Service"]
    checks = req.get("Checks") or ([req["Check"]] if req.get("Check") else [])
    for c in checks:
        cid = c.get("CheckID") or c.get("Name")
        sid = c.get("ServiceID", "")
        sname = ""
        if sid and (node, sid) in STATE["services"]:
            sname = STATE["services"][(node, sid)]["Service"]
            affected.add(sname)
        else:
            affected |= services_of_node(node)
        STATE["checks"][(node, cid)] = {
            "Node": node,
            "CheckID": cid,
            "Name": c.get("Name") or cid,
            "Status": c.get("Status", "critical"),
            "Notes": c.get("Notes", ""),
            "Output": c.get("Output", ""),
            "ServiceID": sid,
            "ServiceName": sname,
            "ServiceTags": [],
            "Type": c.get("Type", ""),
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": STATE["index"] + 1,
            "ModifyIndex": STATE["index"] + 1,
        }
    bump(affected)


def deregister(req):
    node = req.get("Node") or "node1"
    affected = set()
    if req.get("ServiceID"):
        svc = STATE["services"].pop((node, req["ServiceID"]), None)
        if svc:
            affected.add(svc["Service"])
            STATE["node_services"].get(node, {}).pop(req["ServiceID"], None)
        for key in [k for k, c in STATE["checks"].items()
                    if k[0] == node and c["ServiceID"] == req["ServiceID"]]:
            del STATE["checks"][key]
    elif req.get("CheckID"):
        c = STATE["checks"].pop((node, req["CheckID"]), None)
        if c:
            affected |= {c["ServiceName"]} if c["ServiceName"] else services_of_node(node)
    else:
        affected |= services_of_node(node)
        for key in [k for k in STATE["services"] if k[0] == node]:
            del STATE["services"][key]
        for key in [k for k in STATE["checks"] if k[0] == node]:
            del STATE["checks"][key]
        STATE["nodes"].pop(node, None)
        STATE["node_services"].pop(node, None)
    bump(affected)


def set_check(req):
    node = req.get("Node") or "node1"
    c = STATE["checks"].get((node, req["CheckID"]))
    if c is None:
        raise KeyError("no check %s on %s" % (req["CheckID"], node))
    c["Status"] = req["Status"]
    c["Output"] = req.get("Output", c["Output"])
    c["ModifyIndex"] = STATE["index"] + 1
    bump({c["ServiceName"]} if c["ServiceName"] else services_of_node(node))


def service_index(name):
    # A service never seen answers with the tables' index, as Consul does.
    return max(STATE["service_index"].get(name, STATE["index"]), 1)


# --- a tiny subset of Consul's filter language (go-bexpr): enough for tests
def resolve_selector(entry, sel):
    v = entry
    for part in sel.split("."):
        if isinstance(v, dict) and part in v:
            v = v[part]
        else:
            raise ValueError('Selector "%s" is not valid' % sel)
    return v


def eval_filter(expr, entry):
    clauses = [c.strip() for c in expr.split(" and ")]
    for c in clauses:
        neg = False
        if " not in " in c:
            value, sel = c.split(" not in ", 1)
            neg = True
            op = "in"
        elif " in " in c:
            value, sel = c.split(" in ", 1)
            op = "in"
        elif "==" in c:
            sel, value = c.split("==", 1)
            op = "=="
        elif "!=" in c:
            sel, value = c.split("!=", 1)
            op = "!="
        else:
            raise ValueError("1:1 (%d): no match found, expected: \"!=\", \"==\", \"in\"" % len(c))
        value = value.strip().strip('"')
        got = resolve_selector(entry, sel.strip())
        if op == "in":
            ok = value in got
            ok = not ok if neg else ok
        elif op == "==":
            ok = str(got) == value
        else:
            ok = str(got) != value
        if not ok:
            return False
    return True


def health_entries(name, q, token):
    """(entries, filtered_by_acl) for /v1/health/service/NAME."""
    out = []
    by_owner = {}  # (node, service id or "") -> checks
    for (n, _), c in sorted(STATE["checks"].items()):
        by_owner.setdefault((n, c["ServiceID"]), []).append(c)
    for (node, sid), svc in sorted(STATE["services"].items()):
        if svc["Service"] != name:
            continue
        tags = q.get("tag", [])
        if any(t not in svc["Tags"] for t in tags):
            continue
        checks = by_owner.get((node, ""), []) + by_owner.get((node, sid), [])
        entry = {"Node": dict(STATE["nodes"][node], CreateIndex=5, ModifyIndex=5,
                              Partition="", PeerName="", Locality=None),
                 "Service": svc, "Checks": checks}
        out.append(entry)
    if "passing" in q and q["passing"][0] not in ("0", "false"):
        out = [e for e in out if all(c["Status"] == "passing" for c in e["Checks"])]
    if q.get("filter"):
        out = [e for e in out if eval_filter(q["filter"][0], e)]
    filtered = False
    acl = STATE["acl"]
    if acl["enabled"]:
        allowed = acl["tokens"].get(token, acl["anonymous"]) if token else acl["anonymous"]
        if "*" not in allowed and name not in allowed:
            filtered = bool(out)
            out = []
    random.shuffle(out)
    return out, filtered


def parse_wait(text):
    """Go's time.ParseDuration for the forms clients send."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, num = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            num += ch
            i += 1
            continue
        unit = "ms" if text[i:i + 2] == "ms" else ch
        if unit not in units or not num:
            raise ValueError(text)
        total += float(num) * units[unit]
        num = ""
        i += len(unit)
    if num:
        raise ValueError(text)
    return total


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "consul-api-double"
    sys_version = ""

    def log_message(self, fmt, *args):
        pass

    def setup(self):
        super().setup()
        # Go (Consul) sets TCP_NODELAY on every connection; without it the body,
        # written after the head, would wait for the client's delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn_id = next(CONN_IDS)

    def send_plain(self, code, text, extra=()):
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def read_json(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"null")

    def do_PUT(self):
        path = urllib.parse.urlsplit(self.path).path
        try:
            req = self.read_json()
            with LOCK:
                if path == "/v1/catalog/register":
                    register(req)
                elif path == "/v1/catalog/deregister":
                    deregister(req)
                else:
                    return self.send_plain(404, "Not Found")
            self.send_plain(200, "true", [("X-Consul-Index", str(STATE["index"]))])
        except Exception as e:  # noqa: BLE001 - a test double says what went wrong
            self.send_plain(400, "Request decode failed: %s" % e)

    def token(self):
        t = self.headers.get("X-Consul-Token")
        if not t:
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                t = auth[7:]
        return t

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        if url.path == "/v1/status/leader":
            body = b'"127.0.0.1:8300"'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        prefix = "/v1/health/service/"
        if not url.path.startswith(prefix):
            return self.send_plain(404, "Not Found")
        name = urllib.parse.unquote(url.path[len(prefix):])
        token = self.token()
        rec = {"t": time.time(), "conn": self.conn_id, "path": url.path, "name": name,
               "query": url.query, "index": int(q.get("index", ["0"])[0] or 0),
               "wait": q.get("wait", [""])[0], "token": token}
        with LOCK:
            REQUESTS.append(rec)
            if ARGS.log:
                with open(ARGS.log, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        acl = STATE["acl"]
        if acl["enabled"] and token and token not in acl["tokens"]:
            # Consul resolves the token before it blocks.
            return self.send_plain(403, "ACL not found")
        try:
            index = int(q.get("index", ["0"])[0] or 0)
            wait = min(parse_wait(q["wait"][0]) if q.get("wait") else 300, 600)
        except ValueError:
            return self.send_plain(400, "Invalid wait time")
        with LOCK:
            if index > 0:
                # Until the service's index moves past the one sent, or moves at
                # all (a snapshot restore takes it back), or the wait runs out.
                deadline = time.time() + wait + random.uniform(0, wait / 16)
                start = service_index(name)
                while service_index(name) <= index and service_index(name) == start:
                    left = deadline - time.time()
                    if left <= 0:
                        break
                    LOCK.wait(left)
            # The mode when the answer goes out (a blocked request answers in
            # the mode set while it waited).
            mode = dict(STATE["mode"])
            if mode.get("count") is not None:
                if mode["count"] <= 0:
                    mode = {"mode": "ok"}
                    STATE["mode"] = mode
                else:
                    STATE["mode"]["count"] -= 1
        m = mode["mode"]
        if m == "silent":
            # Hold the connection until the client closes it.
            self.close_connection = True
            try:
                while self.rfile.read(1):
                    pass
            except OSError:
                pass
            return
        if m == "close":
            self.close_connection = True
            return
        if m == "slow_head":
            time.sleep(mode.get("delay", 2))
        acl = STATE["acl"]
        if m == "acl_not_found" or (acl["enabled"] and token and token not in acl["tokens"]):
            return self.send_plain(403, "ACL not found")
        if m == "permission_denied":
            return self.send_plain(403, "Permission denied")
        if m == "no_leader":
            return self.send_plain(500, "No cluster leader")
        if q.get("dc") and q["dc"][0] != ARGS.dc:
            return self.send_plain(500, "No path to datacenter")
        with LOCK:
            try:
                entries, filtered = health_entries(name, q, token)
            except ValueError as e:
                return self.send_plain(400, "Failed to create boolean expression evaluator: %s" % e)
            idx = service_index(name)
        if m == "index_zero":
            idx = 0
        if "backwards" in mode:
            idx = max(1, idx - mode["backwards"])
        body = json.dumps(entries, separators=(",", ":")).encode()
        if m == "malformed":
            body = b'[{"Node":{"Address":"127.0.0.1"},"Service":{"Port":63'
        elif m == "wrong_types":
            body = b'[{"Node":{"Address":"127.0.0.1"},"Service":{"Port":"6380"},"Checks":[]}]'
        elif m == "object":
            body = b'{"error":"not an array"}'
        headers = [("Content-Type", "application/json"), ("Vary", "Accept-Encoding"),
                   ("X-Consul-Effective-Consistency", "leader"),
                   ("X-Consul-Knownleader", "true"), ("X-Consul-Lastcontact", "0"),
                   ("X-Consul-Query-Backend", "blocking-query")]
        if acl["enabled"]:
            headers.append(("X-Consul-Default-Acl-Policy", "deny"))
        if filtered:
            headers.append(("X-Consul-Results-Filtered-By-Acls", "true"))
        if m != "no_index":
            headers.append(("X-Consul-Index", str(idx)))
        if m == "gzip":
            headers.append(("Content-Encoding", "gzip"))
        self.answer(mode, headers, body)

    def answer(self, mode, headers, body):
        m = mode["mode"]
        w = self.wfile
        if m == "http10":
            self.close_connection = True
            w.write(b"HTTP/1.0 200 OK\r\n")
            for k, v in headers:
                w.write(("%s: %s\r\n" % (k, v)).encode())
            w.write(b"\r\n" + body)
            return
        if m in ("huge", "huge_length"):
            size = int(mode.get("bytes", 64 << 20))
            self.send_response(200)
            for k, v in headers:
                self.send_header(k, v)
            if m == "huge_length":
                self.send_header("Content-Length", str(size))
                self.end_headers()
                w.write(b"[")
                self.close_connection = True
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            pad = b" " * 65536
            sent = 0
            try:
                w.write(b"1\r\n[\r\n")
                while sent < size:
                    w.write(b"%x\r\n%s\r\n" % (len(pad), pad))
                    sent += len(pad)
                w.write(b"1\r\n]\r\n0\r\n\r\n")
            except OSError:
                self.close_connection = True
            return
        self.send_response(200)
        for k, v in headers:
            self.send_header(k, v)
        if m == "truncated":
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            w.write(body[: len(body) // 2])
            self.close_connection = True
            return
        # Go's net/http: a body that fits its 2 KiB buffer gets a length, a larger
        # one is chunked.
        chunked = len(body) > 2048 or m in ("close_mid_body", "bad_chunk")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if m == "drip":
            delay = float(mode.get("delay", 0.2))
            data = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)) if chunked else body
            try:
                for i in range(len(data)):
                    w.write(data[i:i + 1])
                    w.flush()
                    time.sleep(delay)
            except OSError:
                self.close_connection = True
            return
        if not chunked:
            w.write(body)
            if m == "drop_keepalive":
                # An agent that closes an idle keep-alive connection without
                # saying so (its idle timeout).
                self.close_connection = True
            return
        if m == "bad_chunk":
            w.write(b"zz\r\n[]\r\n0\r\n\r\n")
            self.close_connection = True
            return
        if m == "close_mid_body":
            half = body[: max(1, len(body) // 2)]
            w.write(b"%x\r\n%s\r\n" % (len(body), half))
            self.close_connection = True
            return
        for i in range(0, len(body), 4096):
            part = body[i:i + 4096]
            w.write(b"%x\r\n%s\r\n" % (len(part), part))
        w.write(b"0\r\n\r\n")
        if m == "drop_keepalive":
            self.close_connection = True


class Control(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, body):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/requests":
            with LOCK:
                return self.reply(200, "".join(json.dumps(r) + "\n" for r in REQUESTS))
        if self.path == "/state":
            with LOCK:
                services = [dict(s, Node=n) for (n, _), s in STATE["services"].items()]
                checks = list(STATE["checks"].values())
                return self.reply(200, json.dumps({"index": STATE["index"], "services": services,
                                                   "checks": checks, "mode": STATE["mode"]}))
        self.reply(404, "{}")

    def do_PUT(self):
        n = int(self.headers.get("Content-Length") or 0)
        try:
            req = json.loads(self.rfile.read(n) or b"null")
            with LOCK:
                if self.path == "/mode":
                    STATE["mode"] = req
                elif self.path == "/acl":
                    # As in Consul, a policy change wakes no blocking query.
                    STATE["acl"] = {"enabled": req.get("enabled", True),
                                    "tokens": req.get("tokens", {}),
                                    "anonymous": req.get("anonymous", [])}
                elif self.path == "/index":
                    STATE["service_index"][req["service"]] = req["index"]
                    LOCK.notify_all()
                elif self.path == "/register":
                    register(req)
                elif self.path == "/deregister":
                    deregister(req)
                elif self.path == "/check":
                    set_check(req)
                elif self.path == "/clear_requests":
                    REQUESTS.clear()
                else:
                    return self.reply(404, "{}")
            self.reply(200, json.dumps({"index": STATE["index"]}))
        except Exception as e:  # noqa: BLE001
            self.reply(400, json.dumps({"error": str(e)}))


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8500)
    p.add_argument("--control-port", type=int, default=18500)
    p.add_argument("--addr", default="127.0.0.1")
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    p.add_argument("--init", help="JSON: {'register': [RegisterRequest...], 'acl': {...}, 'mode': {...}}")
    p.add_argument("--log", help="append every health request to this file (JSON lines)")
    p.add_argument("--dc", default="yunlu_office")
    ARGS = p.parse_args()
    if ARGS.init:
        with open(ARGS.init) as f:
            init = json.load(f)
        with LOCK:
            for r in init.get("register", []):
                register(r)
            if "acl" in init:
                STATE["acl"] = dict({"enabled": True, "tokens": {}, "anonymous": []}, **init["acl"])
            if "mode" in init:
                STATE["mode"] = init["mode"]
    agent = Server((ARGS.addr, ARGS.port), Handler)
    if ARGS.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(ARGS.tls[0], ARGS.tls[1])
        agent.socket = ctx.wrap_socket(agent.socket, server_side=True)
    control = Server(("127.0.0.1", ARGS.control_port), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        agent.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    main()
