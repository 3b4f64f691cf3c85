"""Training pieces without Ray: the streamed examples (held-out split, epochs, batches, survey), the schedule, and a
short fit on the tiny model."""

import collections
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import config

from retrieval_core.mine import exports
from retrieval_core.train import examples as train_examples
from retrieval_core.train import training
from retrieval_core.train.examples import Example, TrainingTable


def examples(queries=20, positives=1):
    return [
        Example(
            train_examples.query_key(f"question {q} about topic {q}"),
            f"question {q} about topic {q}",
            f"answer {q} p{p} about topic {q}",
            (f"other text {q + 1}", f"unrelated {q + 2}"),
        )
        for q in range(queries)
        for p in range(positives)
    ]


def ntuple_file(path, data, rows_per_group=7) -> str:
    """``data`` as the mine's n-tuple export: row groups of about ``rows_per_group`` rows, never splitting a query."""
    n = len(data[0].negatives)
    columns = {
        "anchor": [e.query for e in data],
        "positive": [e.positive for e in data],
        **{f"negative_{i + 1}": [e.negatives[i] for e in data] for i in range(n)},
    }
    table = pa.table(columns).cast(exports.ntuple_schema(n, False))
    with pq.ParquetWriter(str(path), table.schema) as writer:
        for start, stop in exports.query_groups(columns["anchor"], rows_per_group):
            writer.write_table(table.slice(start, stop - start))
    return str(path)


def table_of(tmp_path, data, eval_fraction=0.0, shuffle_buffer=5, seed=1, rows_per_group=7, num_negatives=2):
    url = ntuple_file(tmp_path / "n-tuple.parquet", data, rows_per_group)
    return TrainingTable(url, num_negatives, seed, eval_fraction, shuffle_buffer)


def everything(tmp_path, data, held=(), corpus_size=2000):
    """(table, survey) training on all of ``data``, scoring ``held`` against their positives and ``data``'s texts."""
    table = table_of(tmp_path, data)
    texts = sorted({e.positive for e in held}) + sorted({t for e in data for t in (e.positive, *e.negatives)})
    corpus = {f"e{i}": t for i, t in enumerate(dict.fromkeys(texts))}
    return table, train_examples.Survey(len(data), len(held), list(held), dict(list(corpus.items())[:corpus_size]))


def test_batches_never_repeat_a_query_and_cover_each_example_at_most_once():
    data = examples(queries=30, positives=3)
    random.Random(1).shuffle(data)  # as the shuffle buffer gives them
    batches = list(train_examples.epoch_batches(iter(data), 8))
    assert all(len(b) == 8 and len({e.query_id for e in b}) == 8 for b in batches)
    flat = [e for b in batches for e in b]
    assert len(flat) == len(set(flat)) and len(flat) >= len(data) - 8 * 2


def test_an_epoch_streams_every_training_example_once_in_an_order_of_its_own(tmp_path):
    data = examples(queries=40, positives=2)
    table = table_of(tmp_path, data, eval_fraction=0.25)
    kept = [e for e in data if not train_examples.held_out(e.query, 1, 0.25)]
    first = list(train_examples.epoch_examples(table, 0))
    assert collections.Counter(first) == collections.Counter(kept)
    assert list(train_examples.epoch_examples(table, 0)) == first  # a function of (seed, epoch): resume re-reads it
    assert list(train_examples.epoch_examples(table, 1)) != first
    assert pq.ParquetFile(table.url).metadata.num_row_groups > 5


def test_the_shuffle_buffer_bounds_how_far_an_example_moves(tmp_path):
    """With a buffer of one example the stream is the row groups in the epoch's order, row by row: the reader
    holds a row group and the buffer, never the table."""
    import dataclasses

    data = examples(queries=30, positives=2)
    table = dataclasses.replace(table_of(tmp_path, data), shuffle_buffer=1)
    reader = pq.ParquetFile(table.url)
    by_group = [reader.read_row_group(g).column("positive").to_pylist() for g in range(reader.num_row_groups)]
    expected = [text for g in train_examples.group_order(table, 3) for text in by_group[g]]
    assert [e.positive for e in train_examples.epoch_examples(table, 3)] == expected


def test_held_out_is_decided_per_query_by_hash_and_row_groups_never_split_a_query(tmp_path):
    data = examples(queries=200, positives=3)
    table = table_of(tmp_path, data, eval_fraction=0.2)
    held = {e.query for e in data if table.held_out(e.query)}
    assert 20 <= len(held) <= 60  # about 40 of 200; the hash is fixed, so this is one outcome, not a chance
    assert held == {e.query for e in data if train_examples.held_out(e.query, 1, 0.2)}  # no list needed to decide
    assert held != {e.query for e in data if train_examples.held_out(e.query, 2, 0.2)}  # the seed draws another
    reader = pq.ParquetFile(table.url)
    groups = [set(reader.read_row_group(g).column("anchor").to_pylist()) for g in range(reader.num_row_groups)]
    assert sum(len(g) for g in groups) == 200  # each query in one row group
    assert exports.query_groups(["a", "a", "b", "b", "b", "c"], 2) == [(0, 2), (2, 5), (5, 6)]
    assert exports.query_groups(["a"] * 5, 2) == [(0, 5)]


def test_the_survey_counts_and_scores_whole_queries_within_its_bounds(tmp_path):
    data = examples(queries=200, positives=2)
    table = table_of(tmp_path, data, eval_fraction=0.2)
    held = [e for e in data if table.held_out(e.query)]
    surveyed = train_examples.survey(table, eval_queries=5, eval_corpus_size=30)
    assert (surveyed.train_examples, surveyed.held_out_examples) == (len(data) - len(held), len(held))
    scored = {e.query for e in surveyed.evaluation}
    assert len(scored) == 5 and all(table.held_out(q) for q in scored)
    assert len(surveyed.evaluation) == 10  # both positives of each scored query
    assert len(surveyed.eval_corpus) == 30 and {e.positive for e in surveyed.evaluation} <= set(
        surveyed.eval_corpus.values()
    )
    assert train_examples.survey(table, 5, 30) == surveyed
    everything_scored = train_examples.survey(table, eval_queries=1000, eval_corpus_size=30)
    assert collections.Counter(everything_scored.evaluation) == collections.Counter(held)


def test_the_survey_reads_no_more_row_groups_than_its_bounds_need(tmp_path, monkeypatch):
    """Nothing held out (or all held-out queries found): the survey stops once it has its documents, holding at
    most twice train.eval_corpus_size texts, whatever the size of the table."""
    data = examples(queries=400, positives=1)
    read = []
    rows = train_examples._rows
    monkeypatch.setattr(
        train_examples, "_rows", lambda table, reader, group: read.append(group) or rows(table, reader, group)
    )
    surveyed = train_examples.survey(
        table_of(tmp_path, data, eval_fraction=0.0), eval_queries=1000, eval_corpus_size=30
    )
    assert surveyed.evaluation == [] and len(surveyed.eval_corpus) == 30 and surveyed.train_examples == 400
    assert len(read) <= 3 < pq.ParquetFile(tmp_path / "n-tuple.parquet").num_row_groups


def test_an_epoch_without_a_batch_is_an_error_not_a_loop(tmp_path, tiny_model):
    """Five queries of twenty positives in batches of eight: no batch can hold eight distinct queries."""
    cfg = config("unused", tmp_path, model=tiny_model, train__batch_size=8, train__num_negatives=2, train__max_steps=3)
    table, surveyed = everything(tmp_path, examples(queries=5, positives=20))
    with pytest.raises(ValueError, match="epoch 0 gave no batch of train.batch_size = 8 distinct queries"):
        training.fit(cfg.train, cfg.model, table, surveyed)


def test_the_table_is_refused_naming_the_setting_when_the_mine_did_not_write_what_training_needs(tmp_path):
    from retrieval_core.config import ConfigError

    ntuple_file(tmp_path / "n-tuple.parquet", examples(queries=4))
    cfg = config("unused", tmp_path, train__num_negatives=2)
    written = {"exports": {"n-tuple": {"path": "n-tuple.parquet", "rows": 4}}}
    table = train_examples.table_of(written, str(tmp_path), cfg.train)
    assert table.columns() == ["anchor", "positive", "negative_1", "negative_2"]
    with pytest.raises(ConfigError, match="keep 'n-tuple' in mine.formats"):
        train_examples.table_of({"exports": {"triplet": {"path": "triplet.parquet"}}}, str(tmp_path), cfg.train)
    more = config("unused", tmp_path, train__num_negatives=3)
    with pytest.raises(ConfigError, match="train.num_negatives = 3 and the mine wrote 2 negatives"):
        train_examples.table_of(written, str(tmp_path), more.train)


def test_steps_and_linear_schedule(tmp_path):
    import torch

    cfg = config("unused", tmp_path, train__batch_size=4, train__epochs=3)
    assert training.steps_plan(cfg.train, 18) == (4, 12)
    cfg = config("unused", tmp_path, train__batch_size=4, train__max_steps=5)
    assert training.steps_plan(cfg.train, 18) == (4, 5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = training.linear_schedule(optimizer, warmup=2, total=6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_fit_lowers_the_loss_and_saves_a_loadable_model(tmp_path, tiny_model):
    from sentence_transformers import SentenceTransformer

    cfg = config(
        "unused",
        tmp_path,
        model=tiny_model,
        train__batch_size=8,
        train__num_negatives=2,
        train__max_steps=12,
        train__learning_rate=5e-3,
        train__warmup_ratio=0,
    )
    data = examples(queries=16)
    model, history = training.fit(cfg.train, cfg.model, *everything(tmp_path, data, data[:4]))
    assert history["steps"] == 12 and len(history["losses"]) == 12
    assert np.mean(history["losses"][-3:]) < np.mean(history["losses"][:3])
    assert history["evaluations"][0]["step"] == 0 and history["evaluations"][-1]["step"] == 12
    model.save(str(tmp_path / "model"))
    reloaded = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    text = ["question 3 about topic 3"]
    np.testing.assert_allclose(reloaded.encode(text), model.encode(text), atol=1e-6)
    base = SentenceTransformer(tiny_model, device="cpu")
    assert not np.allclose(base.encode(text), model.encode(text), atol=1e-4)


def test_a_router_model_trains_both_towers_each_side_routed_by_its_task(tmp_path, family_models):
    from sentence_transformers import SentenceTransformer

    path = family_models["router"]
    cfg = config(
        "unused",
        tmp_path,
        model=path,
        train__batch_size=8,
        train__num_negatives=1,
        train__max_steps=6,
        train__learning_rate=5e-3,
        train__warmup_ratio=0,
    )
    data = examples(queries=16)
    model, history = training.fit(cfg.train, cfg.model, *everything(tmp_path, data, data[:4]))
    assert history["steps"] == 6
    base = SentenceTransformer(path, device="cpu")
    text = ["question 3 about topic 3"]
    assert not np.allclose(base.encode_query(text), model.encode_query(text), atol=1e-4)  # query tower
    assert not np.allclose(base.encode_document(text), model.encode_document(text), atol=1e-4)  # document tower


def test_a_separate_query_encoder_is_refused_by_training(tmp_path, family_models):
    from retrieval_core.config import ConfigError

    cfg = config("unused", tmp_path, model=family_models["dpr"])
    with pytest.raises(ConfigError, match="train fine-tunes one model.*question_encoder"):
        training.check_trainable(cfg.model)


def test_a_training_killed_after_a_checkpoint_resumes_from_it_to_the_uninterrupted_weights(
    tmp_path, tiny_model, faults
):
    """Dropout on: the random generator is part of the checkpoint. 16 queries in batches of 8 make 2 steps an
    epoch, so checkpoints fall at epoch ends and the crash mid-epoch."""
    from retrieval_core.io.faults import InjectedCrash
    from retrieval_core.train import checkpoints

    cfg = config(
        "unused",
        tmp_path,
        model=tiny_model,
        train__batch_size=8,
        train__num_negatives=2,
        train__max_steps=7,
        train__learning_rate=5e-3,
    )
    data, held = examples(queries=16), examples(queries=4)
    table, surveyed = everything(tmp_path, data, held)
    clean, clean_history = training.fit(cfg.train, cfg.model, table, surveyed)
    saved = checkpoints.Checkpoints(str(tmp_path / "ckpt"), "identity-a", every=2)
    faults([{"point": "train", "match": "step-5", "action": "crash"}])
    with pytest.raises(InjectedCrash):
        training.fit(cfg.train, cfg.model, table, surveyed, saved=saved)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest.json", "step-00000004"]
    assert checkpoints.Checkpoints(str(tmp_path / "ckpt"), "identity-b", every=2)._latest() is None  # other run
    steps = []
    model, history = training.fit(
        cfg.train, cfg.model, table, surveyed, saved=saved, on_step=lambda s, t, v: steps.append(s)
    )
    assert steps == [5, 6, 7] and history.pop("resumed_from_step") == 4
    assert history["losses"] == clean_history["losses"] and history["evaluations"] == clean_history["evaluations"]
    resumed, uninterrupted = model.state_dict(), clean.state_dict()
    for name in uninterrupted:
        assert torch_equal(resumed[name], uninterrupted[name]), name


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_matryoshka_training_sums_infonce_over_the_prefixes_and_marks_the_model_for_truncation(tmp_path, tiny_model):
    import torch
    from sentence_transformers import SentenceTransformer

    from retrieval_core.encode import encoding, families

    cfg = config("unused", tmp_path, model=tiny_model, train__num_negatives=2, train__matryoshka_dims=[16, 8])
    model = SentenceTransformer(tiny_model, device="cpu").eval()
    saved = tmp_path / "trained"
    model.save(str(saved))  # before the loss: sentence-transformers' own card would name it
    loss = training.build_loss(model, cfg.train, distributed=False)
    features = training.batch_features(model, examples(queries=6), cfg.train, cfg.model)
    with torch.no_grad():
        got = float(loss(features, None))
        embedded = [model(dict(f))["sentence_embedding"] for f in features]
        expected = 0.0
        for dim in (16, 8):
            unit = [torch.nn.functional.normalize(e[:, :dim], dim=1) for e in embedded]
            scores = unit[0] @ torch.cat(unit[1:]).T / cfg.train.temperature
            expected += float(torch.nn.functional.cross_entropy(scores, torch.arange(len(scores))))
    assert got == pytest.approx(expected, rel=1e-5)
    assert not families.trained_for_truncation(str(saved), str(saved))
    training.mark_matryoshka(str(saved), cfg.train)
    assert families.trained_for_truncation(str(saved), str(saved))
    assert encoding.SentenceTransformerEncoder(cfg.model.__class__(name=str(saved), truncate_dim=8)).dim == 8


def test_matryoshka_dims_are_checked():
    from retrieval_core.config import ConfigError

    for bad in ([8, 16], [16, 16], [0], "64"):
        with pytest.raises(ConfigError, match="'train.matryoshka_dims'"):
            config("unused", "unused", train__matryoshka_dims=bad)
