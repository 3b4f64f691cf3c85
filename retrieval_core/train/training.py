"""Contrastive (InfoNCE) fine-tuning of a sentence-transformers bi-encoder on mined tuples, without Ray.

The loss is sentence-transformers' MultipleNegativesRankingLoss: for each query, cross-entropy of its positive
against every candidate of the batch (all positives and all mined negatives of the batch), over cosine
similarities times ``scale = 1 / train.temperature``. ``train.cached`` uses its cached variant (gradient caching:
large batches in bounded memory). On several workers the embeddings are gathered across workers, so in-batch
negatives span the global batch, and gradients are averaged after each step.

torch and sentence-transformers are imported inside the functions only (like ``encoding``).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import numpy as np

from retrieval_core.config import ConfigError, ModelConfig, TrainConfig
from retrieval_core.encode import encoding, families
from retrieval_core.encode.model_files import resolve_model_path
from retrieval_core.evaluate import metrics
from retrieval_core.io import faults
from retrieval_core.train import checkpoints, examples


def steps_plan(tr: TrainConfig, train_examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps): ``train.max_steps`` when set, else epochs x batches per epoch."""
    per_epoch = max(1, train_examples // tr.batch_size)
    total = tr.max_steps or tr.epochs * per_epoch
    return per_epoch, total


def build_loss(model, tr: TrainConfig, distributed: bool):
    """InfoNCE (cached or not), within sentence-transformers' MatryoshkaLoss when ``train.matryoshka_dims``."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    scale = 1.0 / tr.temperature
    loss: Any
    if tr.cached:
        loss = CachedMultipleNegativesRankingLoss(
            model, scale=scale, mini_batch_size=tr.mini_batch_size, gather_across_devices=distributed
        )
    else:
        loss = MultipleNegativesRankingLoss(model, scale=scale, gather_across_devices=distributed)
    if tr.matryoshka_dims:
        dimension = model.get_embedding_dimension()
        if tr.matryoshka_dims[0] > dimension:
            raise ValueError(f"train.matryoshka_dims = {tr.matryoshka_dims}: the model has {dimension} dimensions")
        loss = MatryoshkaLoss(model, loss, matryoshka_dims=list(tr.matryoshka_dims))
    return loss


def mark_matryoshka(model_dir: str, tr: TrainConfig) -> None:
    """Say in the saved model's card that it was trained for truncation (what ``model.truncate_dim`` looks for)."""
    if tr.matryoshka_dims:
        card = os.path.join(model_dir, "README.md")
        with open(card, "a") as out:
            out.write(f"\n\nTrained with MatryoshkaLoss at dimensions {list(tr.matryoshka_dims)}.\n")


def batch_features(model, batch: list[examples.Example], tr: TrainConfig, mc: ModelConfig) -> list[dict]:
    """Tokenized columns: queries (with the query prompt), positives, then each negative column."""
    device = model.device
    document, query = resolved_prompts(mc)
    columns = [([e.query for e in batch], query, "query"), ([e.positive for e in batch], document, "document")]
    columns += [([e.negatives[i] for e in batch], document, "document") for i in range(tr.num_negatives)]
    features = []
    for texts, prompt, task in columns:  # the task routes each column of an asymmetric (Router) model
        tokens = model.preprocess(texts, prompt=prompt or None, task=task)
        features.append({k: v.to(device) if hasattr(v, "to") else v for k, v in tokens.items()})
    return features


def check_trainable(mc: ModelConfig) -> None:
    """Training fine-tunes one local model: an embedding API, or a family with a separate query encoder (DPR), is
    refused, naming it."""
    if mc.provider != "local":
        raise ConfigError(
            f"train fine-tunes a local model, and model.provider = {mc.provider!r} is an "
            f"embedding API (its weights are the provider's): set model.name to a local model, or "
            f"leave train out of pipeline.stages"
        )
    query_model = families.query_model_name(mc)
    if query_model != mc.name:
        raise ConfigError(
            f"train fine-tunes one model, and queries are encoded by another (model.query_name = "
            f"{query_model!r}, model.name = {mc.name!r}): train a single bi-encoder, or an "
            f"asymmetric one whose query and document modules live in one model (a Router)"
        )


def resolved_prompts(mc: ModelConfig) -> tuple[str, str]:
    """(document prompt, query prompt) the training applies: those the jobs apply (``families``); resolved once
    per model config, not at every step."""
    return _prompts(mc)


@functools.lru_cache(maxsize=4)
def _prompts(model: ModelConfig) -> tuple[str, str]:
    return encoding.encoder_identity(model)["document_prompt"], encoding.query_identity(model)["query_prompt"]


def linear_schedule(optimizer, warmup: int, total: int):
    import torch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    tr: TrainConfig,
    mc: ModelConfig,
    table: examples.TrainingTable,
    surveyed: examples.Survey,
    rank: int = 0,
    world: int = 1,
    reduce_gradients: Callable | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    saved: checkpoints.Checkpoints | None = None,
    device: str = "cpu",
):
    """Train ``mc.name`` on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``) with the examples of ``table``
    (streamed, see :mod:`examples`); this worker takes every ``world``-th example of each global batch, and scores
    ``surveyed``'s held-out examples (none on workers other than the first: pass a survey without them).
    ``on_step(step, total, loss)`` and ``on_epoch(evaluation)`` report progress. With ``saved``, a checkpoint is
    written every ``saved.every`` steps and the training resumes from the latest one, ending with the weights of an
    uninterrupted run. Returns (model, history). Memory: the model, the optimizer state (2x the weights), one
    batch of activations (one mini-batch with ``train.cached``), the reader's row group and shuffle buffer."""
    import torch

    torch.manual_seed(tr.seed)
    model = load_model(mc, device)
    loss = build_loss(model, tr, world > 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tr.learning_rate)
    per_epoch, total = steps_plan(tr, surveyed.train_examples)
    held_out, eval_corpus = surveyed.evaluation, surveyed.eval_corpus
    scheduler = linear_schedule(optimizer, int(tr.warmup_ratio * total), total)
    resumed = saved.restore(model, optimizer, scheduler) if saved else None
    position, history = resumed or (
        checkpoints.Position(),
        {
            "steps": total,
            "steps_per_epoch": per_epoch,
            "losses": [],
            "evaluations": [evaluate(model, mc, held_out, eval_corpus, step=0)],
        },
    )
    started = time.perf_counter()
    while position.step < total:
        batches = examples.epoch_batches(examples.epoch_examples(table, position.epoch), tr.batch_size)
        number = -1
        for number, batch in enumerate(batches):
            if number < position.batch:
                continue  # done before the checkpoint this training resumed from
            if position.step >= total:
                break
            local = batch[rank::world]
            history["losses"].append(_step(model, loss, optimizer, scheduler, local, tr, mc, reduce_gradients))
            position = checkpoints.Position(position.step + 1, position.epoch, number + 1)
            if saved and saved.due(position.step, total):
                saved.save(model, optimizer, scheduler, position, history)
            faults.point("train", f"step-{position.step}")
            if on_step:
                on_step(position.step, total, history["losses"][-1])
        if number < 0:
            raise ValueError(
                f"epoch {position.epoch} gave no batch of train.batch_size = {tr.batch_size} distinct queries: "
                f"lower train.batch_size or mine more queries"
            )
        position = checkpoints.Position(position.step, position.epoch + 1, 0)
        history["evaluations"].append(evaluate(model, mc, held_out, eval_corpus, step=position.step))
        if on_epoch:
            on_epoch(history["evaluations"][-1])
    history["seconds"] = round(time.perf_counter() - started, 3)
    if resumed:
        history["resumed_from_step"] = resumed[0].step
    model.eval()
    return model, history


def load_model(mc: ModelConfig, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        resolve_model_path(mc.name, mc.storage_options),
        device=str(device),
        trust_remote_code=mc.trust_remote_code,
    )
    if mc.max_seq_length:
        model.max_seq_length = mc.max_seq_length
    return model


def _step(
    model,
    loss,
    optimizer,
    scheduler,
    local: list[examples.Example],
    tr: TrainConfig,
    mc: ModelConfig,
    reduce_gradients: Callable | None,
) -> float:
    """One optimizer step on this worker's share of a batch; returns the loss."""
    import torch

    model.train()
    value = loss(batch_features(model, local, tr, mc), torch.arange(len(local), device=model.device))
    optimizer.zero_grad()
    value.backward()
    if reduce_gradients:
        reduce_gradients(model)
    optimizer.step()
    scheduler.step()
    return round(float(value.detach()), 5)


def evaluate(model, mc: ModelConfig, held_out: list[examples.Example], corpus: dict[str, str], step: int) -> dict:
    """nDCG@10 of the held-out queries (their positives relevant) over ``corpus``, exact cosine search."""
    import torch

    if not held_out:
        return {"step": step, "ndcg@10": None, "queries": 0}
    model.eval()
    ids, texts = list(corpus), list(corpus.values())
    where = {t: i for i, t in zip(ids, texts)}
    queries = {e.query_id: e.query for e in held_out}
    qrels: dict[str, dict[str, int]] = {}
    for e in held_out:
        qrels.setdefault(e.query_id, {})[where[e.positive]] = 1
    with torch.inference_mode():
        document, query = resolved_prompts(mc)
        docs = model.encode_document(
            texts,
            batch_size=mc.batch_size,
            prompt=document,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        qv = model.encode_query(
            list(queries.values()),
            batch_size=mc.batch_size,
            prompt=query,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
    top = np.argsort(-(qv @ docs.T), axis=1, kind="stable")[:, :10]
    run = {qid: [ids[j] for j in row] for qid, row in zip(queries, top)}
    figures = metrics.evaluate_run(run, qrels, ndcg_ks=(10,), recall_ks=(10,), mrr_ks=(10,))
    return {"step": step, "ndcg@10": round(figures["ndcg@10"], 5), "queries": figures["queries"], "corpus": len(corpus)}


def average_gradients(model) -> None:
    """All-reduce (mean) every gradient over the default process group (set up by Ray Train)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= world
