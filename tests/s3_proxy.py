"""A small fault-injecting HTTP proxy in front of the test S3 server: what a network store
does that a disk does not. Every request is forwarded to the server unless a rule that
matches it (method and a piece of its path) still has faults to give:

- ``slowdown``: answer ``503 SlowDown`` (S3's throttling reply), as S3 does under load;
- ``slow``: wait ``delay_s`` before forwarding;
- ``drop``: close the connection without an answer;
- ``hang``: hold the request and never answer (a server that stopped answering).

The proxy listens on 127.0.0.1 (port 0) and talks to the server on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class Rule:
    fault: str  # slowdown | slow | drop | hang
    method: str = "GET"
    path: str = "/activations/c/"  # a piece of the request's path: chunk objects by default
    times: int = 1 << 30  # how many matching requests get the fault
    delay_s: float = 1.0
    hit: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.times > self.hit and method == self.method and self.path in path


@dataclass
class Proxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    endpoint: str = ""
    released: threading.Event = field(default_factory=threading.Event)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of each request
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Proxy:
        proxy = self
        target = urlsplit(self.upstream)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:  # requests come in on several threads at once
                    proxy.seen.append((self.command, self.path))
                    rule = next(
                        (r for r in proxy.rules if r.matches(self.command, self.path)), None
                    )
                    if rule is not None:
                        rule.hit += 1
                if rule is not None:
                    if rule.fault == "slowdown":
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(SLOWDOWN)))
                        self.end_headers()
                        if self.command != "HEAD":  # a HEAD reply has no body
                            self.wfile.write(SLOWDOWN)
                        return
                    if rule.fault == "drop":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if rule.fault == "hang":
                        proxy.released.wait(600)
                        self.close_connection = True
                        return
                    time.sleep(rule.delay_s)  # slow
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                # Headers as they came (the Host the request was signed for included)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                head = self.command == "HEAD"  # no body: its Content-Length is the object's
                for k, v in reply.getheaders():
                    skip = ("transfer-encoding", "connection") + (
                        () if head else ("content-length",)
                    )
                    if k.lower() not in skip:
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        host, port = self.server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def hits(self, fault: str) -> int:
        return sum(r.hit for r in self.rules if r.fault == fault)
