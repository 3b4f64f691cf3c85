"""Selection of negatives from search results: each rule against hand-worked cases."""

import numpy as np
import pytest

from retrieval_core.mine.negatives import Rules, effective_range_max, scorable, search_depth, select

SCORES = np.array([0.95, 0.90, 0.85, 0.80, 0.70, 0.60, 0.50, 0.40], dtype=np.float32)
IDS = np.array([10, 11, 12, 13, 14, 15, 16, -1])
HASHES = np.array(["h10", "h11", "h12", "h13", "h14", "h15", "h16", ""], dtype=object)


def pick(rules, positives=(11,), positive_scores=(0.9,), positive_hashes=("h11",), range_max=8, query_id="q"):
    return select(
        SCORES, IDS, HASHES, set(positives), list(positive_scores), set(positive_hashes), rules, range_max, query_id
    )


def test_top_skips_positives_missing_and_same_text():
    hashes = HASHES.copy()
    hashes[2] = "h11"  # document 12 has the positive's text
    got = select(SCORES, IDS, hashes, {11}, [0.9], {"h11"}, Rules(num_negatives=3), 8, "q")
    assert got.ids == [10, 13, 14]
    assert got.ranks == [1, 4, 5]
    assert got.filtered["positive"] == 1 and got.filtered["same_text"] == 1 and got.filtered["missing"] == 1


def test_relative_margin_uses_the_lowest_positive_score():
    # positives score 0.9 and 0.8 -> floor 0.8; relative 0.1 keeps score <= 0.8 - 0.08 = 0.72
    got = pick(
        Rules(num_negatives=2, relative_margin=0.1),
        positives=(11, 13),
        positive_scores=(0.9, 0.8),
        positive_hashes=("h11", "h13"),
    )
    assert got.ids == [14, 15]
    assert got.filtered["relative_margin"] == 2  # 10 (0.95) and 12 (0.85); 11 and 13 went as positives


def test_absolute_margin_and_score_bounds():
    # floor 0.9; absolute 0.15: keep score + 0.15 <= 0.9 -> score <= 0.75
    got = pick(Rules(num_negatives=5, absolute_margin=0.15, min_score=0.55))
    assert got.ids == [14, 15]
    assert got.filtered["absolute_margin"] == 3 and got.filtered["min_score"] == 1
    got = pick(Rules(num_negatives=2, max_score=0.82))
    assert got.ids == [13, 14] and got.filtered["max_score"] == 2


def test_range_min_and_range_max_count_surviving_candidates():
    # survivors in order: 10, 12, 13, 14, 15, 16; range_max 4 keeps 10..14, range_min 2 skips 10 and 12
    got = pick(Rules(num_negatives=3, range_min=2), range_max=4)
    assert got.ids == [13, 14]


def test_random_sampling_is_seeded_per_query_and_sorted_by_score():
    rules = Rules(num_negatives=3, sampling="random", seed=7)
    a, b = pick(rules, query_id="q1"), pick(rules, query_id="q1")
    assert a.ids == b.ids and len(a.ids) == 3
    assert a.scores == sorted(a.scores, reverse=True)
    assert set(a.ids) <= {10, 12, 13, 14, 15, 16}
    draws = {tuple(pick(rules, query_id=f"q{i}").ids) for i in range(30)}
    assert len(draws) > 5  # different queries draw differently
    other_seed = {
        tuple(pick(Rules(num_negatives=3, sampling="random", seed=8), query_id=f"q{i}").ids) for i in range(30)
    }
    assert other_seed != draws


def test_too_few_survivors_give_an_incomplete_query():
    got = pick(Rules(num_negatives=3, max_score=0.55))
    assert got.ids == [16] and got.scores == [pytest.approx(0.5)]


def test_default_range_max_follows_sentence_transformers_and_widens_with_score_filters():
    assert effective_range_max(Rules(num_negatives=3), max_positives=2) == 5
    assert effective_range_max(Rules(num_negatives=3, range_min=4, relative_margin=0.05), 2) == 4 + 100 + 2
    assert effective_range_max(Rules(num_negatives=20, relative_margin=0.05), 1) == 200 + 1
    assert effective_range_max(Rules(num_negatives=3, range_max=50), 2) == 50
    assert search_depth(36, 2) == 38


def test_a_cross_encoder_widens_the_default_window_and_rescores_only_what_the_score_free_rules_keep():
    assert effective_range_max(Rules(num_negatives=3), 2, rescored=True) == 100 + 2
    assert effective_range_max(Rules(num_negatives=3, range_max=7), 2, rescored=True) == 7
    ids = np.array([4, 9, -1, 7, 5])
    hashes = np.array(["a", "b", "", "p", "c"], dtype=object)
    assert scorable(ids, hashes, {4}, {"p"}).tolist() == [False, True, False, False, True]
