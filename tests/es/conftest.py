"""A real Elasticsearch for the shipping tests: one node per test session.

deploy/es/es fetches the server zip from Maven Central once (cached under
/var/cache/kvmscope/es) and runs it as the user kvmscope-es on 127.0.0.1
(single node, security off, 512 MB heap). The node's data is wiped at the
start of each session, and every test writes to its own namespace, so tests
never see each other's documents.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
ES = ROOT / "deploy" / "es" / "es"
# one node per directory: engineers running the suite side by side each set their own
NODE_DIR = Path(os.environ.get("KVMSCOPE_ES_NODE_DIR", "/var/lib/kvmscope-es/pytest"))


class EsNode:
    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def es(self, *args, timeout=240) -> subprocess.CompletedProcess:
        r = subprocess.run(["/usr/bin/python3", str(ES), *args, "--dir", str(NODE_DIR)], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0 and args[0] != "status":
            raise RuntimeError(f"deploy/es/es {' '.join(args)} failed: {r.stderr[-2000:]}")
        return r

    def stop(self):
        self.es("stop")

    def start(self) -> float:
        t0 = time.monotonic()
        self.es("start", "--port", str(self.port))
        return time.monotonic() - t0

    def client(self):
        from elasticsearch import Elasticsearch

        return Elasticsearch(self.url, request_timeout=30)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def ids(self, namespace: str) -> dict[str, int]:
        """event.id -> number of documents with it, over every kvmscope data stream of the namespace."""
        c = self.client()
        c.indices.refresh(index=f"*-kvmscope.*-{namespace}", allow_no_indices=True, ignore_unavailable=True)
        out: dict[str, int] = {}
        resp = c.search(index=f"*-kvmscope.*-{namespace}", size=10000, source=["event.id"], allow_no_indices=True,
                        ignore_unavailable=True, query={"match_all": {}}, track_total_hits=True)
        assert resp["hits"]["total"]["value"] < 10000
        for h in resp["hits"]["hits"]:
            eid = h["_source"]["event"]["id"]
            assert eid == h["_id"]
            out[eid] = out.get(eid, 0) + 1
        return out


@pytest.fixture(scope="session")
def es_node():
    if os.geteuid() != 0:
        pytest.skip("Elasticsearch refuses root but is started through runuser as kvmscope-es: needs root")
    subprocess.run(["/usr/bin/python3", str(ES), "stop", "--dir", str(NODE_DIR)], capture_output=True, timeout=120)
    shutil.rmtree(NODE_DIR / "data", ignore_errors=True)
    t0 = time.monotonic()
    r = subprocess.run(["/usr/bin/python3", str(ES), "start", "--dir", str(NODE_DIR), "--json"], capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"could not start Elasticsearch: {r.stderr[-3000:]}")
    st = json.loads(r.stdout)
    sys.stderr.write(f"\nelasticsearch {st['version']} on 127.0.0.1:{st['port']} up in {time.monotonic() - t0:.1f}s\n")
    node = EsNode(st["port"])
    yield node
    subprocess.run(["/usr/bin/python3", str(ES), "stop", "--dir", str(NODE_DIR)], capture_output=True, timeout=120)


@pytest.fixture
def namespace():
    return "t" + uuid.uuid4().hex[:10]



class Proxy:
    """A tiny loopback HTTP proxy in front of Elasticsearch that can answer 429 or be down.

    mode "forward": pass requests through; "429": answer bulk requests with 429
    (what a cluster with a full write queue answers); down(): the port refuses
    connections (as when the node is stopped); up(): listen again on the same port.

    Per item: ``fail_items[id] = (status, times)`` keeps that document out of the
    bulk request the node gets and answers it ``status`` in the node's real
    response, ``times`` times (None: always); ``sent[id]`` counts each
    document's sends.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.port = free_port()
        self.mode = "forward"
        self.rejected = 0
        self.forwarded = 0
        self.fail_items: dict[str, tuple[int, int | None]] = {}
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()
        self._srv = None
        self._conns: set = set()  # open client connections (keep-alive): cut on down()
        self.up()

    def up(self):
        proxy = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()
                proxy._conns.add(self.connection)

            def finish(self):
                proxy._conns.discard(self.connection)
                super().finish()

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                if proxy.mode == "429" and "_bulk" in self.path:
                    proxy.rejected += 1
                    data = json.dumps({"error": {"type": "es_rejected_execution_exception",
                                                 "reason": "rejected execution (queue capacity 1)"}, "status": 429}).encode()
                    self.send_response(429)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("X-Elastic-Product", "Elasticsearch")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                held = {}  # position in the request -> (action, status) answered here, not by the node
                if "_bulk" in self.path and body and self.command in ("POST", "PUT"):
                    body, held = proxy._take_items(body)
                    if body is None:  # every document answered here
                        return self._reply(200, {"Content-Type": "application/json",
                                                 "X-Elastic-Product": "Elasticsearch"},
                                           proxy._merge({"took": 0, "errors": False, "items": []}, held))
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command)
                for k in ("Content-Type", "Accept", "Authorization"):
                    if self.headers.get(k):
                        req.add_header(k, self.headers[k])
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        status, headers, data = r.status, r.headers, r.read()
                except urllib.error.HTTPError as e:
                    status, headers, data = e.code, e.headers, e.read()
                proxy.forwarded += 1
                if held and status == 200:
                    data = proxy._merge(json.loads(data), held)
                self._reply(status, headers, data)

            def _reply(self, status, headers, data):
                self.send_response(status)
                for k in ("Content-Type", "X-Elastic-Product"):
                    if headers.get(k):
                        self.send_header(k, headers[k])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Srv(ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that hung up while we went down: expected here

        self._srv = Srv(("127.0.0.1", self.port), H)
        threading.Thread(target=self._srv.serve_forever, daemon=True).start()

    def _take_items(self, body: bytes):
        """Split the documents to fail off an NDJSON bulk body: (the rest or None, {position: (action, status)})."""
        lines = body.split(b"\n")
        keep, held = [], {}
        for pos in range(len(lines) // 2):
            action, doc = lines[2 * pos], lines[2 * pos + 1]
            op, meta = next(iter(json.loads(action).items()))
            with self._lock:
                self.sent[meta["_id"]] = self.sent.get(meta["_id"], 0) + 1
                fail = self.fail_items.get(meta["_id"])
                if fail is not None:
                    status, times = fail
                    if times is not None and times <= 1:
                        del self.fail_items[meta["_id"]]
                    elif times is not None:
                        self.fail_items[meta["_id"]] = (status, times - 1)
                    held[pos] = ({op: meta}, status)
                    continue
            keep += [action, doc]
        return (b"\n".join(keep) + b"\n" if keep else None), held

    @staticmethod
    def _merge(resp: dict, held: dict) -> bytes:
        """The node's bulk response with the held documents' answers put back in their places."""
        items = list(resp.get("items", []))
        for pos in sorted(held):
            action, status = held[pos]
            op, meta = next(iter(action.items()))
            kind = "es_rejected_execution_exception" if status == 429 else "unavailable_shards_exception"
            items.insert(pos, {op: {"_index": meta["_index"], "_id": meta["_id"], "status": status,
                                    "error": {"type": kind, "reason": f"injected by the test proxy ({status})"}}})
        resp["items"] = items
        resp["errors"] = resp.get("errors", False) or bool(held)
        return json.dumps(resp).encode()

    def down(self):
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            self._srv = None
        for c in list(self._conns):  # and the kept-alive connections, as a dead node would
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def proxy(es_node):
    p = Proxy(es_node.url)
    yield p
    p.down()


def wait_for(pred, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
