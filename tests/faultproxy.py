"""A fault-injecting HTTP proxy on 127.0.0.1 for storage tests.

It forwards each request to an upstream S3 server (the moto server in tests) and, on every
`every_n`-th request, injects the next fault of its script instead:

- "slowdown": 503 with an S3 `SlowDown` XML body (not forwarded)
- "error500": 500 with an S3 `InternalError` XML body (not forwarded)
- "reset": the connection is reset before any response (not forwarded)
- "truncate": the response body is cut in half and the connection closed. Only object downloads
  are truncated, because botocore 1.44.8 reads other response bodies outside its retry handler,
  so other requests get "reset" instead.

Independently, every download whose key contains `corrupt_key` gets one byte flipped.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULT_KINDS = ("slowdown", "error500", "reset", "truncate")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}
_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>faultproxy</RequestId></Error>"
)


class FaultProxy:
    """Threaded proxy; use as a context manager, which yields the proxy with `endpoint` set."""

    def __init__(
        self,
        upstream: str,
        faults: Sequence[str] = FAULT_KINDS,
        every_n: int = 0,
        corrupt_key: str | None = None,
    ) -> None:
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.faults = list(faults)
        self.every_n = every_n
        self.corrupt_key = corrupt_key
        self.injected: Counter[str] = Counter()  # fault kind -> count, plus "corrupt"
        self.request_count = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> str:
        """Start serving on a free loopback port and return the endpoint URL."""
        handler = type("BoundHandler", (_ProxyHandler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # resets are expected
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def next_fault(self) -> str | None:
        """Count a request and return the fault to inject into it, if any."""
        with self._lock:
            self.request_count += 1
            if not self.faults or self.every_n <= 0 or self.request_count % self.every_n:
                return None
            return self.faults[(self.request_count // self.every_n - 1) % len(self.faults)]

    def record(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        pass

    def do_GET(self) -> None:
        self._proxy_request()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the connection was reset on purpose

    def _proxy_request(self) -> None:
        body = self._read_request_body()
        fault = self.proxy.next_fault()
        is_download = self._is_object_download()
        if fault == "truncate" and not is_download:
            fault = "reset"

        if fault == "slowdown":
            self._send_error_xml(503, "SlowDown", "Please reduce your request rate.")
        elif fault == "error500":
            self._send_error_xml(500, "InternalError", "We encountered an internal error. Please try again.")
        elif fault == "reset":
            self._reset_connection()
        if fault in ("slowdown", "error500", "reset"):
            self.proxy.record(fault)
            return

        status, reason, headers, response_body = self._forward(body)
        if is_download and self.proxy.corrupt_key and self.proxy.corrupt_key in self.path and response_body:
            corrupted = bytearray(response_body)
            corrupted[len(corrupted) // 2] ^= 0xFF
            response_body = bytes(corrupted)
            self.proxy.record("corrupt")

        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        if self.command == "HEAD":
            length = next((value for name, value in headers if name.lower() == "content-length"), "0")
            self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(len(response_body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "truncate" and len(response_body) > 1:
            self.wfile.write(response_body[: len(response_body) // 2])
            self.wfile.flush()
            self.proxy.record("truncate")
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(response_body)

    def _read_request_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _is_object_download(self) -> bool:
        path, _, query = self.path.partition("?")
        segments = [segment for segment in path.split("/") if segment]
        return self.command == "GET" and len(segments) >= 2 and "list-type" not in query and "uploads" not in query

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(self.proxy.upstream_host, self.proxy.upstream_port, timeout=60)
        try:
            connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    connection.putheader(name, value)
            if body or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body or None)
            response = connection.getresponse()
            response_body = response.read()
            return response.status, response.reason, response.getheaders(), response_body
        finally:
            connection.close()

    def _send_error_xml(self, status: int, code: str, message: str) -> None:
        payload = _ERROR_XML.format(code=code, message=message).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":  # a HEAD response never has a body
            self.wfile.write(payload)

    def _reset_connection(self) -> None:
        # SO_LINGER with a zero timeout makes close() send a TCP RST instead of a FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()
