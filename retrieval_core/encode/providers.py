"""Embedding APIs as encoders: OpenAI's embeddings API (and the self-hosted servers compatible with it) and
Cohere's embed API, through the providers' own Python SDKs (imported lazily; extras ``openai`` and ``cohere``).

What the SDKs do is left to them: retries with exponential backoff and jitter on 429, 5xx (and, for OpenAI,
timeouts), honouring ``Retry-After``. What they do not do is done here: batching to the provider's limits, requests
in flight at once (``model.max_concurrency``), retrying Cohere's timeouts, checking every response (one finite
vector per text, all of one dimension), counting requests, retries and tokens, and keeping the key out of every
message. A batch that still fails raises :class:`ProviderError` with the provider's message: never a made-up vector.

The key is read from the environment variable ``model.api_key_env`` names (default: the provider's own, below) in
the process that sends the requests; it is never written anywhere and is removed from error messages.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from urllib.parse import urlsplit

import numpy as np

from retrieval_core.config import REDACTED, ModelConfig
from retrieval_core.encode import families

log = logging.getLogger(__name__)
DIMENSION_PROBE = "dimension probe"
MAX_MESSAGE = 600  # characters of a provider's error message kept in ours


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    key_env: str
    max_inputs: int  # texts per request
    max_input_chars: int  # texts are cut to this many characters (0: the provider truncates, see below)
    max_request_chars: int  # characters per request, all texts together (0: no limit but max_inputs)
    dims: dict  # the default dimension of well-known models (others: learnt from the first response)


PROVIDERS = {
    # 2048 inputs, 8192 tokens per input and 300k tokens per request; a token is at least about 2.4 characters in
    # all but unusual text, so 20,000 characters stay under 8,192 tokens and 600,000 under 300k.
    "openai": Provider(
        "openai",
        "https://api.openai.com/v1",
        "OPENAI_API_KEY",
        2048,
        20_000,
        600_000,
        {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536},
    ),
    # 96 texts per request; longer texts are cut by the provider at its token limit (truncate=END)
    "cohere": Provider(
        "cohere",
        "https://api.cohere.com",
        "CO_API_KEY",
        96,
        0,
        0,
        {
            "embed-english-v3.0": 1024,
            "embed-multilingual-v3.0": 1024,
            "embed-english-light-v3.0": 384,
            "embed-multilingual-light-v3.0": 384,
        },
    ),
}
INPUT_TYPES = {"document": "search_document", "query": "search_query"}  # Cohere's input_type of each side


class ProviderError(RuntimeError):
    """An embedding API request failed for good (after the retries), or answered something unusable."""


def provider_of(cfg: ModelConfig) -> Provider:
    return PROVIDERS[cfg.provider]


def base_url(cfg: ModelConfig) -> str:
    return (cfg.base_url or provider_of(cfg).base_url).rstrip("/")


def key_env(cfg: ModelConfig) -> str:
    return cfg.api_key_env or provider_of(cfg).key_env


def max_input_chars(cfg: ModelConfig) -> int:
    return cfg.max_input_chars or provider_of(cfg).max_input_chars


def inputs_per_request(cfg: ModelConfig) -> int:
    return max(1, min(cfg.batch_size, provider_of(cfg).max_inputs))


def api_identity(cfg: ModelConfig, side: str) -> dict:
    """Everything that changes a vector of ``side`` ("document" or "query"), with no weights to hash: provider,
    base URL host, model name, dimensions asked for, the prompt and input type of the side, the character cut and
    normalization. A provider can still change a model behind its name; nothing here can see that."""
    identity = {
        "provider": cfg.provider,
        "host": urlsplit(base_url(cfg)).netloc.rpartition("@")[2],
        "model": cfg.name,
        "dimensions": cfg.truncate_dim,
        f"{side}_prompt": side_prompt(cfg, side),
        "max_input_chars": max_input_chars(cfg),
        "normalize": cfg.normalize,
    }
    if cfg.provider == "cohere":
        identity["input_type"] = INPUT_TYPES[side]
    return identity


def side_prompt(cfg: ModelConfig, side: str) -> str:
    """The prompt put before each text of ``side``: the config's, else the family's (an API has no model files
    with prompts of their own); e.g. a self-hosted E5 behind an OpenAI-compatible server gets ``query: ``."""
    return families.document_prompt(cfg, None) if side == "document" else families.query_prompt(cfg, None)


def api_key(cfg: ModelConfig) -> str:
    name = key_env(cfg)
    key = os.environ.get(name, "")
    if not key:
        raise ProviderError(
            f"model.provider = {cfg.provider!r} needs an API key in the environment variable {name} "
            f"(model.api_key_env), which is not set in this process (pid {os.getpid()}); on a "
            f"cluster, set it on every node"
        )
    return key


def scrub(text: str, key: str) -> str:
    """``text`` without the key, nor anything that looks like a masked key (``sk-ab****yz12``)."""
    if key:
        text = text.replace(key, REDACTED)
    return re.sub(r"\S*\*{4,}\S*", REDACTED, text)


@dataclasses.dataclass
class Usage:
    """What a run cost: HTTP requests sent (retries included), retries, tokens billed, texts sent and texts cut."""

    requests: int = 0
    retries: int = 0
    tokens: int = 0
    texts: int = 0
    truncated: int = 0


def usage_between(before: dict, after: dict | None) -> dict:
    """What an encoder's requests cost between two readings of its usage (``after``: None for no usage)."""
    after = after or {}
    return {k: after[k] - before[k] for k in after}


def usage_total(usages) -> dict:
    total = dataclasses.asdict(Usage())
    for usage in usages:
        for k in total:
            total[k] += usage.get(k, 0)
    return total


class ApiEncoder:
    """The :class:`~retrieval_core.encode.encoding.Encoder` of an embedding API: texts in requests of
    :func:`inputs_per_request` texts (fewer when the provider's characters per request would be passed), up to
    ``model.max_concurrency`` requests in flight; rows normalized when ``model.normalize``."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.provider = provider_of(cfg)
        self.normalized = cfg.normalize
        self._key = api_key(cfg)
        self._dim = cfg.truncate_dim or self.provider.dims.get(cfg.name)
        self._usage = Usage()
        self._lock = threading.Lock()
        self._attempts = threading.local()  # HTTP attempts of the request the current thread is sending
        self._client = (self._openai_client if cfg.provider == "openai" else self._cohere_client)()
        self.chunk_texts = inputs_per_request(cfg) * cfg.max_concurrency * 2  # texts per encode call of a stage
        for name in ("httpx", "httpx2"):  # one INFO line per request otherwise; progress shows the counts
            logging.getLogger(name).setLevel(logging.WARNING)

    # -- clients: the SDKs with our timeout and retries, and a hook that counts every HTTP attempt
    def _count_attempt(self, request) -> None:
        self._attempts.count = getattr(self._attempts, "count", 0) + 1

    def _openai_client(self):
        import openai

        http = openai.DefaultHttpxClient(event_hooks={"request": [self._count_attempt]})
        return openai.OpenAI(
            api_key=self._key,
            base_url=base_url(self.cfg),
            timeout=self.cfg.timeout,
            max_retries=self.cfg.max_retries,
            http_client=http,
        )

    def _cohere_client(self):
        import cohere
        import httpx

        http = httpx.Client(timeout=self.cfg.timeout, event_hooks={"request": [self._count_attempt]})
        return cohere.ClientV2(
            api_key=self._key,
            base_url=base_url(self.cfg),
            timeout=self.cfg.timeout,
            max_retries=self.cfg.max_retries,
            httpx_client=http,
        )

    # -- the Encoder protocol
    @property
    def dim(self) -> int:
        if self._dim is None:  # a model of unknown dimension, asked before any text was encoded
            self.encode_documents([DIMENSION_PROBE])
        assert self._dim is not None, "the dimension probe sets the dimension"
        return self._dim

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, "document")

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, "query")

    def usage(self) -> dict:
        with self._lock:
            return dataclasses.asdict(self._usage)

    # -- batching and concurrency
    def _encode(self, texts: list[str], side: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        prepared = self._prepared(texts, side)
        spans = request_spans([len(t) for t in prepared], inputs_per_request(self.cfg), self.provider.max_request_chars)
        if len(spans) == 1:
            parts = [self._request(prepared, side)]
        else:
            with ThreadPoolExecutor(min(self.cfg.max_concurrency, len(spans))) as pool:
                futures = [pool.submit(self._request, prepared[a:b], side) for a, b in spans]
                try:
                    parts = [f.result() for f in futures]
                except BaseException:
                    for future in futures:  # the batches not yet sent are not sent (nor billed)
                        future.cancel()
                    raise
        vectors = np.vstack(parts)
        if self.cfg.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def _prepared(self, texts: list[str], side: str) -> list[str]:
        """The side's prompt before each text, cut to the character limit (counted)."""
        prompt = side_prompt(self.cfg, side)
        limit = max_input_chars(self.cfg)
        prepared = [prompt + t for t in texts]
        cut = sum(len(t) > limit for t in prepared) if limit else 0
        with self._lock:
            self._usage.truncated += cut
        return [t[:limit] for t in prepared] if cut else prepared

    # -- one request
    def _request(self, texts: list[str], side: str) -> np.ndarray:
        self._attempts.count = 0
        try:
            vectors, tokens = (self._openai_request if self.cfg.provider == "openai" else self._cohere_request)(
                texts, side
            )
        except Exception as exc:  # noqa: BLE001 - every SDK error becomes one message, without the key
            raise ProviderError(self._failure(exc, len(texts))) from None
        finally:
            self._count(len(texts))
        checked = self._checked(vectors, len(texts))
        with self._lock:
            self._usage.tokens += int(round(tokens or 0))
        return checked

    def _count(self, texts: int) -> None:
        attempts = getattr(self._attempts, "count", 0)
        with self._lock:
            self._usage.requests += attempts
            self._usage.retries += max(0, attempts - 1)
            self._usage.texts += texts

    def _openai_request(self, texts: list[str], side: str):
        extra = {"dimensions": self.cfg.truncate_dim} if self.cfg.truncate_dim else {}
        response = self._client.embeddings.create(input=texts, model=self.cfg.name, encoding_format="float", **extra)
        data = list(response.data or [])
        if all(isinstance(getattr(d, "index", None), int) for d in data):
            data.sort(key=lambda d: d.index)  # the API does not promise input order
        usage = getattr(response, "usage", None)
        return [d.embedding for d in data], getattr(usage, "prompt_tokens", 0)

    def _cohere_request(self, texts: list[str], side: str):
        extra = {"output_dimension": self.cfg.truncate_dim} if self.cfg.truncate_dim else {}

        def call():
            return self._client.embed(
                model=self.cfg.name,
                input_type=INPUT_TYPES[side],
                texts=texts,
                embedding_types=["float"],
                truncate="END",
                **extra,
            )

        response = retrying_timeouts(call, self.cfg.max_retries)
        billed = getattr(getattr(response, "meta", None), "billed_units", None)
        return getattr(response.embeddings, "float_", None) or [], getattr(billed, "input_tokens", 0)

    def _checked(self, vectors, count: int) -> np.ndarray:
        """The response's vectors as a (count x dim) float32 array, or an error saying what was wrong."""
        where = f"{self.cfg.provider} model {self.cfg.name!r} at {base_url(self.cfg)}"
        if len(vectors) != count:
            raise ProviderError(f"{where} returned {len(vectors)} vectors for {count} texts")
        try:
            array = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError):
            raise ProviderError(f"{where} returned vectors that are not lists of numbers of one length") from None
        if array.ndim != 2 or not np.isfinite(array).all():
            raise ProviderError(f"{where} returned vectors that are not finite numbers of one length")
        with self._lock:
            if self._dim is None:
                self._dim = array.shape[1]
        if array.shape[1] != self._dim:
            raise ProviderError(
                f"{where} returned {array.shape[1]}-dimensional vectors, expected {self._dim}"
                f"{' (model.truncate_dim)' if self.cfg.truncate_dim else ''}"
            )
        return array

    def _failure(self, exc: Exception, count: int) -> str:
        attempts = getattr(self._attempts, "count", 0)
        status = getattr(exc, "status_code", None)
        body = getattr(exc, "body", None)
        detail = f"HTTP {status}: {body}" if status is not None and body is not None else str(exc) or repr(exc)
        message = (
            f"{self.cfg.provider} embeddings request for {count} texts to {base_url(self.cfg)} (model "
            f"{self.cfg.name!r}) failed after {attempts} attempt(s) ({type(exc).__name__}): "
            f"{detail[:MAX_MESSAGE]}"
        )
        return scrub(message, self._key)


def request_spans(lengths: list[int], max_inputs: int, max_chars: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) spans of texts, each of at most ``max_inputs`` texts and, when ``max_chars``, at
    most that many characters (a single longer text still makes a span of its own)."""
    spans, start, chars = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start >= max_inputs or (max_chars and chars + n > max_chars)):
            spans.append((start, i))
            start, chars = i, 0
        chars += n
    if lengths:
        spans.append((start, len(lengths)))
    return spans


def retrying_timeouts(call: Callable, retries: int, base: float = 0.5, cap: float = 8.0):
    """``call()``, again after a timeout up to ``retries`` times, waiting ``base * 2**n`` seconds (at most
    ``cap``, less up to a quarter at random): for the SDKs that retry 429 and 5xx but not timeouts (Cohere's)."""
    import httpx

    for attempt in range(retries + 1):
        try:
            return call()
        except httpx.TimeoutException:
            if attempt == retries:
                raise
            delay = min(cap, base * 2**attempt) * (1 - 0.25 * random.random())
            log.info("embedding request timed out; retrying in %.2f s", delay)
            time.sleep(delay)
