"""An S3 endpoint that fails for a while, for the tests: an HTTP proxy on 127.0.0.1 in front of the moto server,
answering requests the test picks with S3's own error replies (500 ``InternalError``, 503 ``SlowDown``) instead of
forwarding them, and forwarding everything else unchanged.

It runs in the test's process, so every process of the job (driver, Ray workers) that reaches the store through it
draws from the same faults::

    store = FlakyStore(upstream="http://127.0.0.1:5000").start()
    store.fail(method="PUT", status=500, times=3)        # the next 3 PUTs answer 500
    store.fail(method="PUT", status=500, when="shard-00001", times=None)   # every PUT of that key, until heal()
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CODES = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Failure:
    """Answer ``status`` to the next ``times`` requests (None = all, until healed) of ``method`` whose path
    contains ``when``."""

    method: str
    status: int
    when: str = ""
    times: int | None = 1

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.when in urllib.parse.unquote(path) and self.times != 0


class FlakyStore:
    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.failures: list[Failure] = []
        self.failed: list[tuple[str, str, int]] = []  # (method, path, status) of every request answered with an error
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FlakyStore":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail(self, method: str, status: int = 500, when: str = "", times: int | None = 1) -> None:
        with self.lock:
            self.failures.append(Failure(method, status, when, times))

    def heal(self) -> None:
        with self.lock:
            self.failures.clear()
            self.failed.clear()

    def _failure_for(self, method: str, path: str) -> int | None:
        with self.lock:
            for failure in self.failures:
                if failure.matches(method, path):
                    if failure.times is not None:
                        failure.times -= 1
                    self.failed.append((method, urllib.parse.unquote(path), failure.status))
                    return failure.status
        return None

    def _handler(self):
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _serve(self):
                body = self._body()
                status = store._failure_for(self.command, self.path)
                if status is not None:
                    return self._error(status)
                connection = http.client.HTTPConnection(store.upstream.hostname, store.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    if body is not None:
                        headers["Content-Length"] = str(len(body))
                    connection.request(self.command, self.path, body=body, headers=headers)
                    reply = connection.getresponse()
                    data = reply.read()
                    self.send_response(reply.status, reply.reason)
                    for key, value in reply.getheaders():
                        if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    length = reply.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    connection.close()

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(chunk)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else (b"" if self.command in ("PUT", "POST") else None)

            def _error(self, status: int) -> None:
                code, message = CODES[status]
                data = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                    f"</Message><RequestId>flaky</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        return Handler
