"""A local stand-in of two embedding APIs on 127.0.0.1, for the tests: OpenAI's ``POST /v1/embeddings`` and
Cohere's ``POST /v2/embed``, with the providers' request and response shapes, bearer-key checks, and faults a test
scripts (status codes with or without ``Retry-After``, slow answers, malformed bodies, a vector too few).

Its vectors are feature-hashed words (:func:`fake_vector`), so related texts score higher, as with a real model,
and a test can compute the exact vector of any text; Cohere's ``input_type`` adds a feature of its own, so a query
sent as a document gets another vector.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

WORD = re.compile(r"\w+")
DEFAULT_DIM = 32


def fake_vector(text: str, dim: int = DEFAULT_DIM, input_type: str = "") -> np.ndarray:
    """The stand-in's vector of ``text`` (not normalized: the jobs must normalize it themselves)."""
    vector = np.zeros(dim, dtype=np.float64)
    for token in WORD.findall(text.lower()) + ([f"__{input_type}__"] if input_type else []):
        digest = hashlib.sha256(token.encode()).digest()
        weight = 2.0 + int.from_bytes(digest[5:7], "little") / 65536  # uneven weights: scores rarely tie
        vector[int.from_bytes(digest[:4], "little") % dim] += weight if digest[4] & 1 else -weight
    if not vector.any():
        vector[0] = 1.0
    return vector


def expected_vectors(texts: list[str], dim: int = DEFAULT_DIM, input_type: str = "", prefix: str = "") -> np.ndarray:
    """What the jobs should store for ``texts``: the stand-in's vectors of ``prefix + text``, normalized."""
    vectors = np.array([fake_vector(prefix + t, dim, input_type) for t in texts], dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@dataclass
class Fault:
    """The answer to the next ``times`` requests (whose texts contain ``when``, if set) instead of the vectors."""

    status: int = 200
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (a slow server; past the client's timeout: a timeout)
    malformed: bool = False  # a 200 whose body is not JSON
    wrong_count: bool = False  # a 200 with one vector less than texts
    times: int = 1
    when: str = ""


@dataclass
class Request:
    path: str
    texts: list
    status: int
    body: dict


class FakeEmbeddingAPI:
    def __init__(self, key: str, dim: int = DEFAULT_DIM):
        self.key = key
        self.dim = dim
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.delay = 0.0  # seconds every answer waits (to see requests overlap)
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeEmbeddingAPI":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        """No faults, an empty log; after the answers still being written (to a client that timed out) are done."""
        deadline = time.monotonic() + 10
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            self.faults, self.requests, self.delay, self.max_in_flight = [], [], 0.0, 0

    def fail(self, **kwargs) -> None:
        self.faults.append(Fault(**kwargs))

    def texts_sent(self, status: int = 200) -> list[str]:
        """Every text of the requests answered with ``status``."""
        return [t for r in self.requests if r.status == status for t in r.texts]

    def _fault_for(self, texts: list[str]) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and (not fault.when or any(fault.when in t for t in texts)):
                    fault.times -= 1
                    return fault
        return None

    def answer(self, path: str, headers, body: dict) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one request."""
        cohere = path.endswith("/v2/embed")
        texts = list(body.get("texts" if cohere else "input") or [])
        status, out_headers, payload = self._answer(cohere, headers, body, texts)
        with self._lock:
            self.requests.append(Request(path, texts, status, body))
        return status, out_headers, payload

    def _answer(self, cohere: bool, headers, body: dict, texts: list[str]) -> tuple[int, dict, bytes]:
        sent_key = (headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if sent_key != self.key:
            masked = f"{sent_key[:3]}{'*' * 20}{sent_key[-4:]}"
            return (
                401,
                {},
                _json(
                    {
                        "error": {
                            "message": f"Incorrect API key provided: {masked} (received '{sent_key}')",
                            "type": "invalid_request_error",
                        }
                    }
                ),
            )
        fault = self._fault_for(texts)
        if fault and fault.delay:
            time.sleep(fault.delay)
        if fault and fault.status != 200:
            return (
                fault.status,
                fault.headers,
                _json({"error": {"message": f"fake status {fault.status}"}, "message": f"fake status {fault.status}"}),
            )
        if fault and fault.malformed:
            return 200, {}, b'{"data": [ this is not json'
        if self.delay:
            time.sleep(self.delay)
        dim = int(body.get("output_dimension" if cohere else "dimensions") or self.dim)
        input_type = body.get("input_type", "") if cohere else ""
        vectors = [fake_vector(t, dim, input_type).tolist() for t in texts]
        if fault and fault.wrong_count:
            vectors = vectors[:-1]
        tokens = sum(len(WORD.findall(t)) for t in texts)
        if cohere:
            return (
                200,
                {},
                _json(
                    {
                        "id": "fake",
                        "response_type": "embeddings_by_type",
                        "texts": texts,
                        "embeddings": {"float": vectors},
                        "meta": {"billed_units": {"input_tokens": float(tokens)}},
                    }
                ),
            )
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return (
            200,
            {},
            _json(
                {
                    "object": "list",
                    "data": data[::-1],
                    "model": body.get("model"),  # out of order
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                }
            ),
        )


def _json(value) -> bytes:
    return json.dumps(value).encode()


def _handler(api: FakeEmbeddingAPI):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 - the http.server name
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            with api._lock:
                api.in_flight += 1
                api.max_in_flight = max(api.max_in_flight, api.in_flight)
            try:
                status, headers, payload = api.answer(self.path, self.headers, body)
            finally:
                with api._lock:
                    api.in_flight -= 1
            try:
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                pass

        def log_message(self, *args):  # quiet
            pass

    return Handler
