"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint, for tests of retry behaviour.

A seeded share of requests gets ``503 SlowDown`` (S3's XML error) or a dropped connection, half each;
the rest are forwarded verbatim (method, target, headers including Host, body) so SigV4 still verifies.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 "<Message>Please reduce your request rate.</Message><Resource>{resource}</Resource>"
                 "<RequestId>fault-proxy-{n}</RequestId></Error>")


class FaultProxy:
    """Proxy to ``backend_url`` that fails ``fail_rate`` of requests, chosen by ``random.Random(seed)`` in arrival order.

    Counters: ``requests`` (received), ``injected_503``, ``injected_drops``, ``forwarded``, ``connections`` (accepted).
    """

    def __init__(self, backend_url: str, fail_rate: float = 0.2, seed: int = 0) -> None:
        url = urllib.parse.urlsplit(backend_url)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"need an http://host:port backend, got {backend_url!r}")
        self.backend = (url.hostname, url.port or 80)
        self.fail_rate = fail_rate
        self.requests = 0
        self.injected_503 = 0
        self.injected_drops = 0
        self.forwarded = 0
        self.connections = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the running proxy."""
        if self._server is None:
            raise RuntimeError("proxy not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> str:
        """Listen on a free loopback port in a background thread; returns the endpoint URL."""
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop accepting, close open client connections, join the server thread."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(10)
        self._server = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _decide(self) -> str:
        """``"503"``, ``"drop"`` or ``"forward"`` for the next request, and count it."""
        with self._lock:
            self.requests += 1
            if self._rng.random() >= self.fail_rate:
                self.forwarded += 1
                return "forward"
            if self._rng.random() < 0.5:
                self.injected_503 += 1
                return "503"
            self.injected_drops += 1
            return "drop"


class _Handler(BaseHTTPRequestHandler):
    """One client connection (HTTP/1.1 keep-alive); holds its own keep-alive connection to the backend."""

    proxy: FaultProxy
    protocol_version = "HTTP/1.1"
    timeout = 120
    backend_conn: http.client.HTTPConnection | None = None

    def setup(self) -> None:
        super().setup()
        with self.proxy._lock:
            self.proxy._conns.add(self.connection)
            self.proxy.connections += 1

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.proxy._lock:
                self.proxy._conns.discard(self.connection)
            if self.backend_conn is not None:
                self.backend_conn.close()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: no line per request on stderr."""

    def _read_body(self) -> bytes:
        """The request body, de-chunked if it came with ``Transfer-Encoding: chunked``."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline(65537).split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _proxy(self) -> None:
        action = self.proxy._decide()
        if action == "drop":  # close without answering: the client sees a closed or reset connection
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        body = self._read_body()
        if action == "503":
            self._send_slow_down()
            return
        try:
            try:
                status, reason, headers, data = self._forward(body)
            except ConnectionError:  # includes http.client.RemoteDisconnected
                # the backend may have closed our idle keep-alive connection: retry once on a fresh one
                if self.backend_conn is not None:
                    self.backend_conn.close()
                status, reason, headers, data = self._forward(body)
        except (OSError, http.client.HTTPException):
            if self.backend_conn is not None:
                self.backend_conn.close()
            self.send_response_only(502, "Bad Gateway")
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            return
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)  # also sets close_connection on "Connection: close"
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request to the backend verbatim and read its whole response."""
        if self.backend_conn is None:
            self.backend_conn = http.client.HTTPConnection(*self.proxy.backend, timeout=120)
        conn = self.backend_conn
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in self.headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        if chunked:
            conn.send((f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n")
        elif body:
            conn.send(body)
        resp = conn.getresponse()
        data = resp.read()
        headers = []
        for k, v in resp.getheaders():
            if k.lower() == "transfer-encoding":
                continue
            headers.append((k, v))
        if resp.getheader("Transfer-Encoding") and self.command != "HEAD":
            headers.append(("Content-Length", str(len(data))))
        return resp.status, resp.reason, headers, data

    def _send_slow_down(self) -> None:
        n = self.proxy.requests
        xml = SLOW_DOWN_XML.format(resource=urllib.parse.urlsplit(self.path).path, n=n).encode()
        self.send_response_only(503, "Slow Down")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml)))
        self.send_header("x-amz-request-id", f"fault-proxy-{n}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _proxy
