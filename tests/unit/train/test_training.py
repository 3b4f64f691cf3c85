"""Training pieces without Ray: batching, the held-out split, the schedule, and a short fit on the tiny model."""

import numpy as np
import pytest
from helpers import config

from retrieval_core.train import training
from retrieval_core.train.training import Example


def examples(queries=20, positives=1):
    return [
        Example(
            f"q{q}",
            f"question {q} about topic {q}",
            f"answer {q} p{p} about topic {q}",
            (f"other text {q + 1}", f"unrelated {q + 2}"),
        )
        for q in range(queries)
        for p in range(positives)
    ]


def test_batches_never_repeat_a_query_and_cover_each_example_at_most_once():
    data = examples(queries=30, positives=3)
    batches = training.epoch_batches(data, 8, seed=1, epoch=0)
    assert all(len(b) == 8 and len({e.query_id for e in b}) == 8 for b in batches)
    flat = [e for b in batches for e in b]
    assert len(flat) == len(set(flat)) and len(flat) >= len(data) - 8 * 2
    assert training.epoch_batches(data, 8, 1, 0) == batches
    assert training.epoch_batches(data, 8, 1, 1) != batches


def test_split_keeps_each_query_on_one_side():
    data = examples(queries=50, positives=2)
    train, held = training.split_examples(data, 0.2, seed=3)
    assert {e.query_id for e in train}.isdisjoint({e.query_id for e in held})
    assert len({e.query_id for e in held}) == 10 and len(train) + len(held) == len(data)
    assert training.split_examples(data, 0.2, seed=3) == (train, held)


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
    model, history = training.fit(
        cfg.train, cfg.model, data, data[:4], training.eval_corpus_for(cfg.train, data[:4], data)
    )
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
    model, history = training.fit(
        cfg.train, cfg.model, data, data[:4], training.eval_corpus_for(cfg.train, data[:4], data)
    )
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
    corpus = training.eval_corpus_for(cfg.train, held, data)
    clean, clean_history = training.fit(cfg.train, cfg.model, data, held, corpus)
    saved = checkpoints.Checkpoints(str(tmp_path / "ckpt"), "identity-a", every=2)
    faults([{"point": "train", "match": "step-5", "action": "crash"}])
    with pytest.raises(InjectedCrash):
        training.fit(cfg.train, cfg.model, data, held, corpus, saved=saved)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest.json", "step-00000004"]
    assert checkpoints.Checkpoints(str(tmp_path / "ckpt"), "identity-b", every=2)._latest() is None  # other run
    steps = []
    model, history = training.fit(
        cfg.train, cfg.model, data, held, corpus, saved=saved, on_step=lambda s, t, v: steps.append(s)
    )
    assert steps == [5, 6, 7] and history.pop("resumed_from_step") == 4
    assert history["losses"] == clean_history["losses"] and history["evaluations"] == clean_history["evaluations"]
    resumed, uninterrupted = model.state_dict(), clean.state_dict()
    for name in uninterrupted:
        assert torch_equal(resumed[name], uninterrupted[name]), name


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
