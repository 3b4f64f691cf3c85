"""Encoders: the protocol the jobs use, and the sentence-transformers adapter.

torch and sentence-transformers are imported here (and in :mod:`rescoring` and :mod:`training`) only, and lazily,
so the rest of the library stays light.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from retrieval_core.config import ModelConfig
from retrieval_core.encode import families, hardware
from retrieval_core.encode.model_files import WEIGHT_SUFFIXES, model_files_hash, resolve_model_path
from retrieval_core.io.manifest import digest

log = logging.getLogger(__name__)

CHUNK_BATCHES = 8


class Encoder(Protocol):
    """Turns texts into a float32 array of shape (n, dim); rows are unit length when ``normalized``.

    Optional: ``chunk_texts`` (texts per call that keep the encoder busy; see :func:`encode_by_length`) and
    ``usage()`` (what the encoder's requests cost so far: an embedding API's; see :func:`usage_of`).
    """

    normalized: bool

    @property
    def dim(self) -> int: ...

    def encode_documents(self, texts: list[str]) -> np.ndarray: ...

    def encode_queries(self, texts: list[str]) -> np.ndarray: ...


# The default model (all-MiniLM-L6-v2: 90.9 MB of float32 weights) encodes about 12 SciFact documents (title +
# abstract, up to 256 tokens) per second per CPU on this project's 2-core reference machines; a GPU is taken as
# about 100 times that. Larger models are taken as proportionally slower (cost ~ weight bytes). Used only to size
# automatic shards, never to promise a speed.
REFERENCE_WEIGHT_BYTES = 90_868_376
REFERENCE_DOCS_PER_S_PER_CPU = 12.0
GPU_SPEEDUP = 100.0


API_REQUEST_SECONDS = 1.0  # taken for one embedding API request, to size shards only


def estimated_docs_per_s(cfg: ModelConfig, cpus: int, gpus: float) -> float:
    """A rough encoding rate of one worker with ``cpus`` CPUs (or ``gpus`` GPUs), scaled by the model's weight
    bytes against the default model's; for an embedding API, its requests in flight times their texts."""
    if cfg.provider != "local":
        from retrieval_core.encode.providers import inputs_per_request

        return cfg.max_concurrency * inputs_per_request(cfg) / API_REQUEST_SECONDS
    weights = (
        sum(
            p.stat().st_size
            for p in Path(resolve_model_path(cfg.name, cfg.storage_options)).rglob("*")
            if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
        )
        or REFERENCE_WEIGHT_BYTES
    )
    per_cpu = REFERENCE_DOCS_PER_S_PER_CPU * REFERENCE_WEIGHT_BYTES / weights
    return per_cpu * (GPU_SPEEDUP * gpus if gpus else max(1, cpus))


def effective_max_seq_length(model_dir: str, configured: int | None) -> int | None:
    if configured:
        return configured
    path = Path(model_dir) / "sentence_bert_config.json"
    if path.is_file():
        return json.loads(path.read_text()).get("max_seq_length")
    return None


def encoder_identity(cfg: ModelConfig) -> dict:
    """Everything that changes a document vector, and the fingerprint (sha256) over it.

    Computed from the model's files alone (no model load), so a driver can check it cheaply. The document prompt
    is the one applied (``families``: the config's, else the model's own, else the family's). An embedding API's
    identity is its provider, host, model, dimensions and prompt (``providers.api_identity``).
    """
    if cfg.provider != "local":
        from retrieval_core.encode.providers import api_identity

        return _fingerprinted(api_identity(cfg, "document"))
    model_dir = resolve_model_path(cfg.name, cfg.storage_options)
    identity = _model_identity(cfg, cfg.name, model_dir)
    identity["document_prompt"] = families.document_prompt(cfg, model_dir)
    return _fingerprinted(identity)


def query_identity(cfg: ModelConfig) -> dict:
    """Everything that changes a query vector (the query encoder's files, the query prompt applied, length,
    precision, normalization, truncation), and its fingerprint: what the stages that encode queries record."""
    if cfg.provider != "local":
        from retrieval_core.encode.providers import api_identity

        return _fingerprinted(api_identity(cfg, "query"))
    name = families.query_model_name(cfg)
    model_dir = resolve_model_path(name, cfg.storage_options)
    identity = _model_identity(cfg, name, model_dir)
    identity["query_prompt"] = families.query_prompt(cfg, model_dir)
    return _fingerprinted(identity)


def query_side(cfg: ModelConfig) -> dict:
    """What the query side adds to the document encoder's fingerprint: the query prompt applied and the query
    model, each only when present or different (empty for a symmetric model without a query prompt, so identities
    that include it stay what they were for such models)."""
    if cfg.provider != "local":
        from retrieval_core.encode.providers import side_prompt

        prompt = side_prompt(cfg, "query")
        return {"query_prompt": prompt} if prompt else {}
    side = {}
    name = families.query_model_name(cfg)
    if name != cfg.name:
        side["query_model"] = query_identity(cfg)["fingerprint"]
    prompt = families.query_prompt(cfg, resolve_model_path(name, cfg.storage_options))
    if prompt:
        side["query_prompt"] = prompt
    return side


def _model_identity(cfg: ModelConfig, name: str, model_dir: str) -> dict:
    cfg = hardware.resolved(cfg)  # a config the jobs did not resolve: this machine's pick, as load_encoder's
    families.check_truncation(cfg, name, model_dir)
    weights, configs = model_files_hash(model_dir)
    identity = {
        "model": name,
        "weights_sha256": weights,
        "config_sha256": configs,
        "max_seq_length": effective_max_seq_length(model_dir, cfg.max_seq_length),
        "normalize": cfg.normalize,
        "precision": cfg.precision,
    }
    if cfg.truncate_dim:  # only when set: the fingerprints of untruncated encoders stay what they were
        identity["truncate_dim"] = cfg.truncate_dim
    if cfg.backend != "torch":  # likewise: vectors equal to float rounding, but not bit for bit
        identity["backend"] = cfg.backend
    return identity


def _fingerprinted(identity: dict) -> dict:
    identity["fingerprint"] = digest(identity)
    return identity


def load_encoder(cfg: ModelConfig, gpus: float = 0, threads: int = 1) -> Encoder:
    """The encoder ``cfg`` describes: an embedding API's (``model.provider``; no torch imported), else the local
    sentence-transformers model on a GPU when ``gpus`` (and CUDA) allow, else on ``threads`` CPU threads."""
    if cfg.provider != "local":
        from retrieval_core.encode.providers import ApiEncoder

        return ApiEncoder(cfg)
    quiet_model_loading()
    set_torch_threads(threads)
    return SentenceTransformerEncoder(hardware.resolved(cfg), pick_device(gpus), threads=threads)


def usage_of(encoder: Encoder) -> dict | None:
    """What the encoder's requests cost so far (requests, retries, tokens, texts, truncated), or None for an
    encoder that sends none (a local model)."""
    usage = getattr(encoder, "usage", None)
    return usage() if usage else None


def quiet_model_loading() -> None:
    """Turn off the download and "Loading weights" progress bars of huggingface_hub and transformers.

    For worker processes, whose bars would interleave with the job's own progress bar.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    huggingface_hub.utils.disable_progress_bars()
    transformers_logging.disable_progress_bar()


def set_torch_threads(num_threads: int) -> None:
    """Pin torch's intra-op threads (a worker uses as many as it has CPUs: no oversubscription)."""
    import torch

    torch.set_num_threads(max(1, int(num_threads)))


def pick_device(gpus: float) -> str:
    if gpus and gpus > 0:
        import torch

        if torch.cuda.is_available():
            return "cuda"
        log.warning("gpus_per_worker = %s but torch sees no CUDA device; encoding on the CPU", gpus)
    return "cpu"


def load_trusted(load: Callable, what: str, trusted: bool):
    """``load(trusted)``: a model loaded with ``trust_remote_code=trusted``. A model that ships its own Python code
    while ``model.trust_remote_code`` is off is refused with a message naming ``what`` and the setting."""
    try:
        return load(trusted)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc) or trusted:
            raise
        raise ValueError(
            f"{what} ships its own Python code, which runs only with model.trust_remote_code: true "
            f"(off by default; set it only for a model you trust)"
        ) from None


class SentenceTransformerEncoder:
    """A sentence-transformers bi-encoder with the job's precision, prompts, length, truncation and normalization.

    Documents go through ``encode_document`` and queries through ``encode_query`` (so asymmetric models route each
    side to its own modules), with the prompts ``families`` resolves; queries use ``model.query_name``'s model when
    the family has a separate query encoder (DPR), loaded on first use.

    ``threads`` > 1 on a CPU: texts are split over that many threads, each running the model with one torch
    thread (a forward pass releases the GIL), which uses several cores better than torch's own intra-op threads on
    the small matrices of sentence encoders (measured: 16.6 against 13.4 docs/s on 2 cores, all-MiniLM-L6-v2,
    SciFact); tokenization, which is not thread-safe, takes turns under a lock.
    """

    def __init__(self, cfg: ModelConfig, device: str = "cpu", threads: int = 1):
        self.cfg = cfg
        self.device = device
        self.batch_size = cfg.batch_size  # lowered for good after running out of memory
        self.exported = False  # the networks run in model.backend's runtime (set by _load)
        self.threads = max(1, int(threads)) if device == "cpu" else 1
        if self.threads > 1:
            set_torch_threads(1)
        model_dir = resolve_model_path(cfg.name, cfg.storage_options)
        self.model, self.dim = self._load(cfg.name, model_dir)
        self.document_prompt = families.document_prompt(cfg, model_dir)
        self.query_name = families.query_model_name(cfg)
        self._query_model = self.model if self.query_name == cfg.name else None
        self.normalized = cfg.normalize
        if cfg.precision == "bf16" and device == "cpu" and not cpu_has_native_bf16() and not self.exported:
            log.warning(
                "model.precision = bf16 on a CPU without avx512_bf16 or AMX: bf16 is emulated there and "
                "much slower than fp32; use model.precision = fp32"
            )

    def _load(self, name: str, model_dir: str):
        from sentence_transformers import SentenceTransformer

        model = load_trusted(
            lambda trust: SentenceTransformer(model_dir, device=self.device, trust_remote_code=trust),
            f"model {name!r}",
            self.cfg.trust_remote_code,
        )
        if self.cfg.max_seq_length:
            model.max_seq_length = self.cfg.max_seq_length
        if self.cfg.backend in ("onnx", "openvino"):
            self._export(model, model_dir)
        dim = int(model.get_embedding_dimension())
        if self.cfg.truncate_dim:
            if self.cfg.truncate_dim > dim:
                raise ValueError(
                    f"model.truncate_dim = {self.cfg.truncate_dim} exceeds the dimension of {name!r} ({dim})"
                )
            families.check_truncation(self.cfg, name, model_dir)
            dim = self.cfg.truncate_dim
        if self.threads > 1:
            model.preprocess = locked(model.preprocess)
        return model, dim

    def _export(self, model, model_dir: str) -> None:
        """``model.backend: onnx | openvino``: the model's networks in that runtime, on CPUs (see ``exported``)."""
        import torch

        from retrieval_core.encode import exported

        if self.device != "cpu":
            log.info("model.backend = %r runs on CPUs: torch encodes on %s", self.cfg.backend, self.device)
            return
        weights, configs = model_files_hash(model_dir)
        key = f"{weights[:16]}-{configs[:16]}-torch{torch.__version__}"
        threads = 1 if self.threads > 1 else torch.get_num_threads()
        self.exported = exported.use_exported(
            model, key, self.cfg.backend, self.cfg.precision, threads, streams=self.threads
        )

    @property
    def query_model(self):
        if self._query_model is None:
            model, dim = self._load(self.query_name, resolve_model_path(self.query_name, self.cfg.storage_options))
            if dim != self.dim:
                raise ValueError(
                    f"model.query_name = {self.query_name!r} gives {dim}-dimensional vectors, "
                    f"model.name = {self.cfg.name!r} {self.dim}: query and document encoders must "
                    f"agree"
                )
            self._query_model = model
        return self._query_model

    @functools.cached_property
    def query_prompt(self) -> str:
        return families.query_prompt(self.cfg, resolve_model_path(self.query_name, self.cfg.storage_options))

    def _encode(self, encode, texts: list[str], prompt: str) -> np.ndarray:
        """``encode`` (a model's encode_document or encode_query) over ``texts``, in parts on the threads."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.threads == 1 or len(texts) <= self.cfg.batch_size:
            return self._encode_here(encode, list(texts), prompt)
        return interleaved_map(lambda part: self._encode_here(encode, part, prompt), list(texts), self.threads)

    def _encode_here(self, encode, texts: list[str], prompt: str) -> np.ndarray:
        """Encode in the calling thread, backing off when memory runs out: the batch size is halved (for the rest
        of this encoder's life, with a warning) and the texts encoded again, down to one text at a time, after
        which :class:`EncoderOutOfMemory` names the longest text."""
        while True:
            batch_size = self.batch_size
            try:
                return self._encode_batches(encode, texts, prompt, batch_size)
            except Exception as exc:  # noqa: BLE001 -- only out-of-memory errors are handled, the rest re-raised
                if not is_out_of_memory(exc):
                    raise
                free_accelerator_memory(self.device)
                if batch_size == 1:
                    raise EncoderOutOfMemory(
                        f"out of memory encoding a single text (the longest of this batch has "
                        f"{max(len(t) for t in texts)} characters) on {self.device}: "
                        f"{_first_line(exc)}; lower model.max_seq_length or corpus.max_text_chars, or give the "
                        f"workers more memory"
                    ) from None
                self.batch_size = min(self.batch_size, max(1, batch_size // 2))
                log.warning(
                    "out of memory at model.batch_size %d on %s (%s): encoding again at %d",
                    batch_size,
                    self.device,
                    _first_line(exc),
                    self.batch_size,
                )

    def _encode_batches(self, encode, texts: list[str], prompt: str, batch_size: int) -> np.ndarray:
        """Autocast and inference mode are per thread; the prompt is passed even when empty, so it is exactly the
        resolved one; truncation, then normalization."""
        import torch

        precision = "fp32" if self.exported else self.cfg.precision  # an exported network runs in its own
        with torch.inference_mode(), autocast(precision, self.device):
            vectors = encode(
                list(texts),
                batch_size=batch_size,
                prompt=prompt,
                truncate_dim=self.cfg.truncate_dim,
                normalize_embeddings=False,
                convert_to_tensor=True,
                show_progress_bar=False,
            )
        vectors = vectors.float()
        if self.cfg.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        return vectors.cpu().numpy().astype(np.float32, copy=False)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        _log_for_tests(texts)
        return self._encode(self.model.encode_document, texts, self.document_prompt)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(self.query_model.encode_query, texts, self.query_prompt)


class EncoderOutOfMemory(RuntimeError):
    """Memory ran out even when encoding one text at a time."""


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, torch's OutOfMemoryError (CUDA), or a RuntimeError of an
    allocator that could not get the memory (torch's CPU allocator: "DefaultCPUAllocator: can't allocate
    memory")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in OUT_OF_MEMORY)


def autocast(precision: str, device: str):
    """The autocast context of ``precision`` (fp32: none) on ``device``; per thread."""
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def interleaved_map(function: Callable[[list], np.ndarray], items: list, threads: int) -> np.ndarray:
    """``function`` over ``threads`` interleaved slices of ``items`` (``items[i::threads]``, so each thread gets
    long and short items alike), one thread each; the rows of the results put back in the items' order."""
    from concurrent.futures import ThreadPoolExecutor

    n = max(1, min(int(threads), len(items)))
    with ThreadPoolExecutor(n) as pool:
        parts = list(pool.map(lambda i: function(items[i::n]), range(n)))
    out = np.empty((len(items), *parts[0].shape[1:]), dtype=parts[0].dtype)
    for i, part in enumerate(parts):
        out[i::n] = part
    return out


def free_accelerator_memory(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def locked(function):
    """``function`` callable from several threads, one call at a time."""
    import threading

    lock = threading.Lock()

    def call(*args, **kwargs):
        with lock:
            return function(*args, **kwargs)

    return call


TEST_ENCODE_LOG = "RETRIEVAL_TEST_ENCODE_LOG"


def _log_for_tests(texts: list[str]) -> None:
    """A hook only tests arm (``RETRIEVAL_TEST_ENCODE_LOG`` = a directory): each document encoded appends its text
    hash to ``<directory>/<pid>.log``, so a test can count what was encoded in any worker process."""
    directory = os.environ.get(TEST_ENCODE_LOG)
    if directory:
        from retrieval_core.io.corpus import text_hash

        with open(os.path.join(directory, f"{os.getpid()}.log"), "a") as log_file:
            log_file.write("".join(f"{text_hash(t)}\n" for t in texts))


def encode_by_length(
    encoder: Encoder, texts: list[str], batch_size: int, on_progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """Encode documents longest first (less padding), in chunks of a few batches (or the encoder's ``chunk_texts``:
    an API encoder's requests in flight); rows come back in input order.

    Memory: the output array (len(texts) x dim float32) plus one chunk of activations.
    """
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = None  # allocated at the first chunk, so an API encoder learns its dimension from a real request
    chunk = max(1, getattr(encoder, "chunk_texts", 0) or batch_size * CHUNK_BATCHES)
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        vectors = encoder.encode_documents([texts[i] for i in rows])
        if out is None:
            out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        out[rows] = vectors
        if on_progress:
            on_progress(len(rows))
    return out if out is not None else np.zeros((0, encoder.dim), dtype=np.float32)


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 natively (avx512_bf16 or AMX flags in /proc/cpuinfo); True where it cannot be read."""
    return hardware.Hardware(hardware.cpu_flags()).native_bf16 or not os.path.exists("/proc/cpuinfo")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
