"""Cross-encoder rescoring of mining candidates, against the cross-encoder called directly."""

import dataclasses
import json

import numpy as np
import pytest
from helpers import build_tiny_cross_encoder, build_tiny_model

from retrieval_core.config import MineConfig, ModelConfig, load_config
from retrieval_core.index import lookup
from retrieval_core.mine import rescoring
from retrieval_core.mine.inputs import MiningQuery


@pytest.fixture(scope="module")
def tiny_ce(tmp_path_factory) -> str:
    return str(build_tiny_cross_encoder(tmp_path_factory.mktemp("ce")))


def direct_scores(model_dir: str, pairs: list[tuple[str, str]]) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    return np.asarray([CrossEncoder(model_dir, device="cpu").predict([p])[0] for p in pairs])


class Rows:
    """What rescoring reads of a row lookup: (doc id, text hash) and the text of each row."""

    def __init__(self, texts: list[str]):
        self.text = dict(enumerate(texts))

    def values(self, rows):
        return {int(r): (f"d{r}", str(hash(self.text[int(r)]))) for r in rows if int(r) >= 0}

    def texts(self, rows):
        return {int(r): self.text[int(r)] for r in rows}


def rescore(rows: Rows, queries, ids, score, **options):
    """rescore_part with the text hashes looked up as a mine part looks them up."""
    positives = rows.values({r for q in queries for r in q.positive_rows})
    return rescoring.rescore_part(
        rows.texts,
        queries,
        ids,
        lookup.text_hashes(rows.values(ids.ravel()), ids),
        {row: text_hash for row, (_, text_hash) in positives.items()},
        score,
        **options,
    )


def test_rescoring_scores_the_candidates_left_by_the_score_free_filters_and_the_positives(tiny_ce):
    texts = ["alpha beta", "gamma", "alpha beta", "delta epsilon", "zeta", "eta theta"]
    queries = [MiningQuery("q0", "first query", ["d0"], [0]), MiningQuery("q1", "second query", ["d4", "d5"], [4, 5])]
    # q0: d0 is its positive, d2 has its positive's text, -1 is no result; q1: d4 is a positive
    ids = np.array([[0, 1, 2, 3, -1], [3, 4, 1, 0, 2]])
    scorer = rescoring.CrossEncoderScorer(dataclasses.replace(MineConfig(), cross_encoder=tiny_ce), ModelConfig())
    got = rescore(Rows(texts), queries, ids, scorer.score)
    assert got.scored.tolist() == [[False, True, False, True, False], [True, False, True, True, True]]
    expected = direct_scores(
        tiny_ce,
        [
            ("first query", texts[1]),
            ("first query", texts[3]),
            ("second query", texts[3]),
            ("second query", texts[1]),
            ("second query", texts[0]),
            ("second query", texts[2]),
        ],
    )
    assert got.candidates[got.scored] == pytest.approx(expected, abs=1e-5)
    assert np.isneginf(got.candidates[~got.scored]).all()
    positives = direct_scores(
        tiny_ce, [("first query", texts[0]), ("second query", texts[4]), ("second query", texts[5])]
    )
    assert got.positives[0] == pytest.approx(positives[:1], abs=1e-5)
    assert got.positives[1] == pytest.approx(positives[1:], abs=1e-5)
    in_steps = rescore(Rows(texts), queries, ids, scorer.score, pairs_per_step=2)
    assert in_steps.candidates[got.scored] == pytest.approx(got.candidates[got.scored], abs=1e-6)
    assert in_steps.positives == [pytest.approx(p, abs=1e-6) for p in got.positives]
    assert list(rescoring._steps(np.array([3, 1, 1, 4, 2]), 4)) == [(0, 2), (2, 3), (3, 4), (4, 5)]


def test_threads_and_small_batches_score_as_one_call(tiny_ce):
    pairs = [(f"query {i}", " ".join(["word"] * (i % 7 + 1)) + f" {i}") for i in range(40)]
    mi = dataclasses.replace(MineConfig(), cross_encoder=tiny_ce, cross_encoder_batch_size=3)
    threaded = rescoring.CrossEncoderScorer(mi, ModelConfig(), threads=2).score(pairs)
    assert threaded.dtype == np.float32 and threaded == pytest.approx(direct_scores(tiny_ce, pairs), abs=1e-5)


def test_identity_follows_files_length_and_precision_and_is_none_without_a_cross_encoder(tiny_ce, tmp_path):
    mi = dataclasses.replace(MineConfig(), cross_encoder=tiny_ce)
    base = rescoring.cross_encoder_identity(mi, ModelConfig())
    assert rescoring.cross_encoder_identity(MineConfig(), ModelConfig()) is None
    assert base == rescoring.cross_encoder_identity(mi, ModelConfig())
    other = str(build_tiny_cross_encoder(tmp_path, seed=1))
    changed = [
        dataclasses.replace(mi, cross_encoder_max_length=32),
        dataclasses.replace(mi, cross_encoder=other),
        dataclasses.replace(mi, cross_encoder_precision="bf16"),
    ]
    fingerprints = {rescoring.cross_encoder_identity(m, ModelConfig())["fingerprint"] for m in changed}
    assert base["fingerprint"] not in fingerprints and len(fingerprints) == 3
    same = dataclasses.replace(mi, cross_encoder_batch_size=7)  # the batch size does not change a score
    assert rescoring.cross_encoder_identity(same, ModelConfig()) == base


def test_a_bi_encoder_a_two_label_model_or_a_missing_directory_is_refused_naming_the_setting(tmp_path):
    bi = str(build_tiny_model(tmp_path))
    with pytest.raises(
        ValueError,
        match=r"mine.cross_encoder = .*tiny-st.* is not a cross-encoder: its architecture "
        r"is BertModel",
    ):
        rescoring.CrossEncoderScorer(dataclasses.replace(MineConfig(), cross_encoder=bi), ModelConfig())
    two = build_tiny_cross_encoder(tmp_path / "two-labels", num_labels=2)
    with pytest.raises(ValueError, match=r"mine.cross_encoder = .*two-labels.* gives 2 scores per pair"):
        rescoring.CrossEncoderScorer(dataclasses.replace(MineConfig(), cross_encoder=str(two)), ModelConfig())
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"mine.cross_encoder = '.*missing' is not a local directory"):
        rescoring.cross_encoder_identity(dataclasses.replace(MineConfig(), cross_encoder=missing), ModelConfig())


def remote_code_model(directory, architecture: str) -> str:
    """A model directory whose config maps to Python code of its own (which would fail loudly if it ran)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": "madeup",
                "architectures": [architecture],
                "auto_map": {
                    "AutoConfig": "configuration_madeup.MadeUpConfig",
                    "AutoModel": "modeling_madeup.MadeUp",
                    "AutoModelForSequenceClassification": "modeling_madeup.MadeUp",
                },
            }
        )
    )
    (directory / "configuration_madeup.py").write_text("raise RuntimeError('the model code ran')\n")
    return str(directory)


def test_a_model_with_its_own_code_is_refused_by_the_encoder_and_the_cross_encoder_naming_the_setting(tmp_path):
    from retrieval_core.encode import encoding

    bi = remote_code_model(tmp_path / "bi", "MadeUpModel")
    with pytest.raises(
        ValueError,
        match=r"model '.*bi' ships its own Python code, which runs only with "
        r"model.trust_remote_code: true",
    ):
        encoding.SentenceTransformerEncoder(ModelConfig(name=bi))
    ce = remote_code_model(tmp_path / "ce", "MadeUpForSequenceClassification")
    with pytest.raises(
        ValueError,
        match=r"mine.cross_encoder = '.*ce' ships its own Python code, which runs only "
        r"with model.trust_remote_code: true",
    ):
        rescoring.CrossEncoderScorer(dataclasses.replace(MineConfig(), cross_encoder=ce), ModelConfig())


@pytest.mark.parametrize(
    "setting, message",
    [
        ("cross_encoder_batch_size=0", r"'mine.cross_encoder_batch_size' = 0: expected >= 1"),
        ("cross_encoder_max_length=0", r"'mine.cross_encoder_max_length' = 0: expected >= 1 or null"),
        ("cross_encoder_precision=fp8", r"'mine.cross_encoder_precision' = 'fp8': expected one of fp32, bf16, fp16"),
    ],
)
def test_bad_cross_encoder_settings_are_refused(setting, message):
    key, value = setting.split("=")
    with pytest.raises(ValueError, match=message):
        load_config(None, [f"mine.{key}={value}"])
