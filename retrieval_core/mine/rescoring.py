"""Cross-encoder rescoring of mining candidates (``mine.cross_encoder``).

With a sentence-transformers ``CrossEncoder``, every candidate of a query in the search window that survives the
score-free filters (a missing result, one of the query's positives, a document whose text equals a positive's)
and each of the query's positives is scored as a (query, document) pair; the margins, ``max_score``,
``min_score``, the ranges and the sampling of :mod:`negatives` then apply to those scores. The bi-encoder's
scores are kept beside them.

Where this differs from sentence-transformers' ``mine_hard_negatives(cross_encoder=...)``, on purpose:
  * it rescores whenever a cross-encoder is given; sentence-transformers ignores the cross-encoder unless a margin,
    ``max_score`` or ``min_score`` is set, so there the negatives stay the bi-encoder's top ones;
  * it does not score the candidates the score-free filters remove (sentence-transformers scores them, then
    discards them): the negatives are the same, the work is less.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from retrieval_core.config import MineConfig, ModelConfig
from retrieval_core.encode import encoding, model_files
from retrieval_core.io.manifest import digest
from retrieval_core.mine import negatives

log = logging.getLogger(__name__)


def cross_encoder_identity(mi: MineConfig, model: ModelConfig) -> dict | None:
    """What changes the cross-encoder's scores (its files, maximum length, precision) and a fingerprint over it;
    None without ``mine.cross_encoder``. Read from the files alone: no model load."""
    if not mi.cross_encoder:
        return None
    model_dir = cross_encoder_dir(mi, model)
    weights, configs = model_files.model_files_hash(model_dir)
    identity = {
        "model": mi.cross_encoder,
        "weights_sha256": weights,
        "config_sha256": configs,
        "max_length": mi.cross_encoder_max_length,
        "precision": mi.cross_encoder_precision,
    }
    return {**identity, "fingerprint": digest(identity)}


def cross_encoder_dir(mi: MineConfig, model: ModelConfig) -> str:
    """The local directory of ``mine.cross_encoder``, checked to hold a sequence-classification model: a
    bi-encoder would load as a cross-encoder with a fresh random head (another one in every worker)."""
    model_dir = model_files.resolve_model_path(mi.cross_encoder, model.storage_options, setting="mine.cross_encoder")
    config = Path(model_dir) / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") if config.is_file() else None
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"mine.cross_encoder = {mi.cross_encoder!r} is not a cross-encoder: its architecture is "
            f"{', '.join(architectures)}, not a sequence classifier (a bi-encoder loaded as a "
            f"cross-encoder gets a random scoring head)"
        )
    return model_dir


class CrossEncoderScorer:
    """A loaded cross-encoder that scores (query, document) pairs with ``mine.cross_encoder_batch_size``,
    ``mine.cross_encoder_max_length`` and ``mine.cross_encoder_precision``. On a CPU with ``threads`` > 1 the
    pairs are split over that many threads, each running the model with one torch thread (as the bi-encoder)."""

    def __init__(self, mi: MineConfig, model: ModelConfig, device: str = "cpu", threads: int = 1):
        from sentence_transformers import CrossEncoder

        self.device, self.precision = device, mi.cross_encoder_precision
        self.batch_size = mi.cross_encoder_batch_size
        self.threads = max(1, int(threads)) if device == "cpu" else 1
        model_dir = cross_encoder_dir(mi, model)
        self.model = encoding.load_trusted(
            lambda trust: CrossEncoder(
                model_dir, device=device, trust_remote_code=trust, max_length=mi.cross_encoder_max_length
            ),
            f"mine.cross_encoder = {mi.cross_encoder!r}",
            model.trust_remote_code,
        )
        if self.model.num_labels != 1:
            raise ValueError(
                f"mine.cross_encoder = {mi.cross_encoder!r} gives {self.model.num_labels} scores per "
                f"pair; rescoring needs a cross-encoder with one (a relevance score)"
            )
        if self.threads > 1:
            encoding.set_torch_threads(1)
            self.model.preprocess = encoding.locked(self.model.preprocess)
        if self.precision == "bf16" and device == "cpu" and not encoding.cpu_has_native_bf16():
            log.warning(
                "mine.cross_encoder_precision = bf16 on a CPU without avx512_bf16 or AMX: bf16 is emulated "
                "there and much slower than fp32"
            )

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """One score per (query, document) pair, float32, in the pairs' order."""
        if len(pairs) <= self.batch_size:
            return self._score_here(pairs)
        return encoding.interleaved_map(self._score_here, pairs, self.threads)

    def _score_here(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Score in the calling thread; when memory runs out the batch size is halved for good (down to 1)."""
        import torch

        while True:
            batch_size = self.batch_size
            try:
                with torch.inference_mode(), encoding.autocast(self.precision, self.device):
                    scores = self.model.predict(
                        list(pairs), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
                    )
                return scores.float().cpu().numpy().reshape(len(pairs))
            except Exception as exc:  # noqa: BLE001 -- only out-of-memory errors are handled, the rest re-raised
                if not encoding.is_out_of_memory(exc) or batch_size == 1:
                    raise
                encoding.free_accelerator_memory(self.device)
                self.batch_size = min(self.batch_size, max(1, batch_size // 2))
                log.warning(
                    "out of memory rescoring at mine.cross_encoder_batch_size %d on %s: scoring again at %d",
                    batch_size,
                    self.device,
                    self.batch_size,
                )


RESCORE_PAIRS = 50_000  # pairs scored per step: bounds the texts a worker holds while it rescores a part


@dataclasses.dataclass
class Rescored:
    """A part's cross-encoder scores: ``candidates`` (n x depth, like the search results; -inf where a candidate
    was not scored), ``positives`` (per query, one score per positive) and which candidates were scored."""

    candidates: np.ndarray
    positives: list[list[float]]
    scored: np.ndarray


def rescore_part(
    texts_of: Callable,
    queries: list,
    ids: np.ndarray,
    hashes: np.ndarray,
    positive_hashes: dict[int, str],
    score: Callable,
    pairs_per_step: int = RESCORE_PAIRS,
) -> Rescored:
    """Score with ``score(pairs)`` each query's candidates ``ids`` (n x depth row ids, -1 = no result; ``hashes``:
    their text hashes) that no score-free filter removes, and each query's positives (``positive_hashes``: row id
    -> text hash); in steps of consecutive queries with at most ``pairs_per_step`` pairs (one query at least), each
    asking ``texts_of(row ids)`` (-> row id -> text) for its own documents' texts only."""
    scored = np.zeros(ids.shape, dtype=bool)
    for i, query in enumerate(queries):
        scored[i] = negatives.scorable(
            ids[i], hashes[i], set(query.positive_rows), {positive_hashes[r] for r in query.positive_rows}
        )
    out = Rescored(np.full(ids.shape, -np.inf, dtype=np.float32), [[] for _ in queries], scored)
    sizes = scored.sum(axis=1) + np.array([len(q.positive_rows) for q in queries], dtype=np.int64)
    for start, stop in _steps(sizes, pairs_per_step):
        _rescore_queries(texts_of, queries, ids, start, stop, score, out)
    return out


def _steps(sizes: np.ndarray, limit: int):
    """(start, stop) of runs of consecutive items whose sizes add up to at most ``limit`` (one item at least)."""
    start, total = 0, 0
    for i, size in enumerate(sizes.tolist()):
        if i > start and total + size > limit:
            yield start, i
            start, total = i, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def _rescore_queries(
    texts_of: Callable, queries: list, ids: np.ndarray, start: int, stop: int, score: Callable, out: Rescored
) -> None:
    """Score queries ``start:stop`` into ``out``."""
    mask, block = out.scored[start:stop], ids[start:stop]
    chosen = queries[start:stop]
    texts = texts_of(set(block[mask].tolist()) | {r for q in chosen for r in q.positive_rows})
    pairs = [(chosen[i].text, texts[int(r)]) for i, r in zip(np.nonzero(mask)[0], block[mask])]
    pairs += [(q.text, texts[r]) for q in chosen for r in q.positive_rows]
    values = score(pairs) if pairs else np.zeros(0, dtype=np.float32)
    count = int(mask.sum())
    out.candidates[start:stop][mask] = values[:count]
    rest = iter(values[count:].tolist())
    for i, query in enumerate(chosen, start=start):
        out.positives[i] = [next(rest) for _ in query.positive_rows]
