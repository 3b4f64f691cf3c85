"""Pure selection of hard negatives from search results, with the meaning of sentence-transformers'
``util.mine_hard_negatives`` options.

Per query, from its search results (best first):
  1. drop missing results, the query's positives (by id) and documents whose text equals a positive's;
  2. ``absolute_margin``: drop a candidate when ``score + margin > p``; ``relative_margin``: when
     ``score > p - |p| * margin``, where p is the query's lowest positive score (NV-Retriever's TopK-MarginPos and
     TopK-PercPos); then ``max_score`` (drop ``score > max``) and ``min_score`` (drop ``score < min``);
  3. keep the first ``range_max`` survivors in score order and skip the first ``range_min`` of them;
  4. ``top``: the first ``num_negatives``; ``random``: ``num_negatives`` of them drawn with a generator seeded from
     ``seed`` and the query id (the same draw on any number of workers), then ordered by score.
Fewer than ``num_negatives`` survivors make the query incomplete. The scores are the bi-encoder's, or a
cross-encoder's when one rescored the candidates and positives (:mod:`rescoring`): the rules are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

FILTERS = ("missing", "positive", "same_text", "absolute_margin", "relative_margin", "max_score", "min_score")


@dataclasses.dataclass(frozen=True)
class Rules:
    num_negatives: int = 3
    range_min: int = 0
    range_max: int = 0
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    sampling: str = "top"
    seed: int = 0

    @property
    def filters_by_score(self) -> bool:
        return any(v is not None for v in (self.absolute_margin, self.relative_margin, self.max_score))


@dataclasses.dataclass
class QueryNegatives:
    ids: list[int]
    scores: list[float]
    ranks: list[int]  # 1-based rank in the query's search results
    filtered: dict[str, int]  # candidates removed by each rule


MARGIN_WINDOW = 100  # candidates per query considered by default when a margin or max_score filters them


def effective_range_max(rules: Rules, max_positives: int, rescored: bool = False) -> int:
    """``range_max``, or when 0: ``range_min + num_negatives + max_positives`` without score filters (as
    sentence-transformers derives it), and ``range_min + max(10 * num_negatives, MARGIN_WINDOW) + max_positives``
    when a margin or max_score filters candidates, or a cross-encoder rescores them (``rescored``: it reorders the
    window, which the narrow one would leave nearly as it is). sentence-transformers takes ``10 * num_negatives``
    there (30 for 3 negatives), which on SciFact with relative_margin 0.05 left queries without any negative; a
    wider window costs a deeper search only."""
    if rules.range_max:
        return rules.range_max
    wide = rules.filters_by_score or rescored
    per_query = max(10 * rules.num_negatives, MARGIN_WINDOW) if wide else rules.num_negatives
    return rules.range_min + per_query + max_positives


def search_depth(range_max: int, max_positives: int) -> int:
    """Results to retrieve per query: ``range_max`` survivors plus room for the positives that get dropped."""
    return range_max + max_positives


def query_seed(seed: int, query_id: str) -> np.random.Generator:
    digest = hashlib.blake2b(str(query_id).encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def _score_free_masks(
    ids: np.ndarray, hashes: np.ndarray, positive_ids: set, positive_hashes: set
) -> list[tuple[str, np.ndarray]]:
    """The rules that need no score: a missing result, one of the query's positives, a positive's text."""
    return [
        ("missing", ids < 0),
        ("positive", np.isin(ids, list(positive_ids))),
        ("same_text", np.isin(hashes, list(positive_hashes))),
    ]


def scorable(ids: np.ndarray, hashes: np.ndarray, positive_ids: set, positive_hashes: set) -> np.ndarray:
    """Mask of the candidates no score-free rule removes: the ones worth rescoring."""
    removed = np.zeros(len(ids), dtype=bool)
    for _, mask in _score_free_masks(ids, hashes, positive_ids, positive_hashes):
        removed |= mask
    return ~removed


def _removal_masks(
    scores: np.ndarray,
    ids: np.ndarray,
    hashes: np.ndarray,
    positive_ids: set,
    positive_hashes: set,
    positive_floor: float,
    rules: Rules,
) -> list[tuple[str, np.ndarray]]:
    """(rule, mask of candidates it removes) in the order the rules apply; later masks may overlap earlier ones."""
    masks = _score_free_masks(ids, hashes, positive_ids, positive_hashes)
    if rules.absolute_margin is not None:
        masks.append(("absolute_margin", scores + rules.absolute_margin > positive_floor))
    if rules.relative_margin is not None:
        masks.append(("relative_margin", scores > positive_floor - abs(positive_floor) * rules.relative_margin))
    if rules.max_score is not None:
        masks.append(("max_score", scores > rules.max_score))
    if rules.min_score is not None:
        masks.append(("min_score", scores < rules.min_score))
    return masks


def select(
    scores: np.ndarray,
    ids: np.ndarray,
    hashes: np.ndarray,
    positive_ids: set,
    positive_scores: list[float],
    positive_hashes: set,
    rules: Rules,
    range_max: int,
    query_id: str,
) -> QueryNegatives:
    """Negatives of one query from its search results ``scores`` / ``ids`` / text ``hashes`` (each (k,), best
    first; id -1 = no result). ``positive_scores`` are the query's scores against each of its positives."""
    floor = float(min(positive_scores)) if positive_scores else np.inf
    removed = np.zeros(len(ids), dtype=bool)
    filtered = {}
    for rule, mask in _removal_masks(scores, ids, hashes, positive_ids, positive_hashes, floor, rules):
        filtered[rule] = int((mask & ~removed).sum())
        removed |= mask
    survivors = np.flatnonzero(~removed)
    order = survivors[np.argsort(-scores[survivors], kind="stable")][:range_max][rules.range_min :]
    if rules.sampling == "random" and len(order) > rules.num_negatives:
        picked = np.sort(query_seed(rules.seed, query_id).choice(len(order), rules.num_negatives, replace=False))
        order = order[picked]
    order = order[: rules.num_negatives]
    return QueryNegatives(
        ids=ids[order].tolist(),
        scores=scores[order].astype(float).tolist(),
        ranks=(order + 1).tolist(),
        filtered=filtered,
    )
