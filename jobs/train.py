"""Fine-tune the bi-encoder on the mined negatives (InfoNCE).

Reads:  <output.root>/negatives/exports/n-tuple.parquet (the mined tuples with their texts), streamed by each
        worker (retrieval_core.train.examples); model.name is the base model.
Writes: the fine-tuned model to train.output (default <output.root>/model), loadable with
        SentenceTransformer(path), with training.json (settings, losses, held-out nDCG@10 per epoch).
The loss is sentence-transformers' MultipleNegativesRankingLoss (scale = 1 / train.temperature) over in-batch
negatives plus train.num_negatives mined negatives per query. One worker trains in this process; with
runtime.num_workers > 1, Ray Train runs data-parallel workers (gradients averaged every step).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

from jobs import _cli, _progress
from jobs.ray import cluster
from jobs.ray import training as ray_training
from retrieval_core.config import Config
from retrieval_core.encode import encoding
from retrieval_core.io import storage
from retrieval_core.io.folder import Folder
from retrieval_core.io.manifest import IncompatibleOutputError, digest, stamp
from retrieval_core.mine import mining
from retrieval_core.train import checkpoints, examples, training

log = logging.getLogger("jobs.train")
KEYS = (
    "output.root",
    "model.name",
    "train.epochs",
    "train.batch_size",
    "train.learning_rate",
    "train.num_negatives",
    "train.temperature",
    "train.cached",
    "train.max_steps",
    "train.output",
    "runtime.num_workers",
)  # for --help


def output_of(cfg: Config) -> str:
    return cfg.train.output or storage.join(cfg.output.root, "model")


def identity_of(cfg: Config) -> dict:
    mined = mining.read_mine_manifest(Folder.output(cfg.output))
    settings = {k: v for k, v in vars(cfg.train).items() if k != "checkpoint_steps"}  # same weights whatever it is
    if not settings["matryoshka_dims"]:
        del settings["matryoshka_dims"]  # trainings from before the setting keep their identity
    return {
        "base": encoding.encoder_identity(cfg.model)["fingerprint"],
        "train": settings,
        "negatives": digest(mined["identity"]),
        "workers": max(1, cfg.runtime.num_workers),
        **encoding.query_side(cfg.model),
    }


def run(cfg: Config) -> dict:
    """Train (or reuse a finished training with the same identity); returns the training record."""
    cfg = cluster.read_version(cfg)
    output = output_of(cfg)
    record_url = storage.join(output, "training.json")
    identity = identity_of(cfg)
    if storage.exists(record_url, cfg.output.storage_options):
        record = storage.read_json(record_url, cfg.output.storage_options)
        if record["identity"] == identity:
            checkpoints_of(cfg, identity).remove()  # left by a run killed after its commit record
            return {**record, "reused": True}
        if not cfg.output.overwrite:
            raise IncompatibleOutputError(
                f"'{output}' holds a model trained with other settings; set "
                f"output.overwrite=true or another train.output"
            )
    training.check_trainable(cfg.model)
    started = time.perf_counter()
    table, surveyed = training_data(cfg)
    saved = checkpoints_of(cfg, identity)
    history = (
        _train_distributed(cfg, table, surveyed, output, saved)
        if cfg.runtime.num_workers > 1
        else _train_here(cfg, table, surveyed, output, saved)
    )
    record = {
        **stamp(),
        "stage": "train",
        "identity": identity,
        "output": output,
        "examples": surveyed.train_examples,
        "held_out_examples": surveyed.held_out_examples,
        "scored_examples": len(surveyed.evaluation),
        "history": history,
        "seconds": round(time.perf_counter() - started, 3),
        "config": cfg.to_dict(),
    }
    storage.write_json_atomic(record_url, record, cfg.output.storage_options)
    saved.remove()
    return {**record, "reused": False}


def training_data(cfg: Config) -> tuple[examples.TrainingTable, examples.Survey]:
    """The mine's n-tuple export as the training reads it, and its survey (counts, the held-out examples scored,
    their documents): one pass over its query column, then a few row groups."""
    folder = Folder.output(cfg.output)
    table = examples.table_of(
        mining.read_mine_manifest(folder), folder.join("negatives"), cfg.train, cfg.output.storage_options
    )
    surveyed = examples.survey(table, cfg.train.eval_queries, cfg.train.eval_corpus_size)
    if surveyed.train_examples < cfg.train.batch_size:
        raise ValueError(
            f"{surveyed.train_examples} training examples are fewer than train.batch_size = "
            f"{cfg.train.batch_size}: lower train.batch_size or mine more queries"
        )
    log.info(
        "training on %d examples (%d held out, %d of them scored against %d documents)",
        surveyed.train_examples,
        surveyed.held_out_examples,
        len(surveyed.evaluation),
        len(surveyed.eval_corpus),
    )
    return table, surveyed


def checkpoints_of(cfg: Config, identity: dict) -> checkpoints.Checkpoints:
    """The training's checkpoints, under ``<train.output>/_checkpoints``, tied to its identity."""
    return checkpoints.Checkpoints(
        storage.join(output_of(cfg), checkpoints.DIRECTORY),
        digest(identity),
        cfg.train.checkpoint_steps,
        cfg.output.storage_options,
        world=max(1, cfg.runtime.num_workers),
    )


def _train_here(cfg: Config, table, surveyed, output: str, saved: checkpoints.Checkpoints) -> dict:
    encoding.set_torch_threads(encoding.cpu_count())
    bar = _progress.bar(cfg.runtime, training.steps_plan(cfg.train, surveyed.train_examples)[1], "train", "step")

    def on_step(step: int, total: int, loss: float) -> None:
        bar.update(step - bar.n)  # a resumed training starts past 0
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    try:
        model, history = training.fit(
            cfg.train,
            cfg.model,
            table,
            surveyed,
            on_epoch=_log_epoch,
            on_step=on_step,
            saved=saved,
            device=encoding.pick_device(cfg.runtime.gpus_per_worker),
        )
    finally:
        bar.close()
    save_model(model, output, cfg)
    return history


def _log_epoch(evaluation: dict) -> None:
    log.info("step %d: held-out nDCG@10 %s", evaluation["step"], evaluation["ndcg@10"])


def _train_distributed(cfg: Config, table, surveyed, output: str, saved: checkpoints.Checkpoints) -> dict:
    """Ray Train: ``runtime.num_workers`` workers, each ``runtime.cpus_per_worker`` CPUs (and GPUs), each reading
    the table itself (what they are sent is bounded by the settings: the table's URL and the survey). A failed
    worker group is restarted up to ``runtime.max_restarts`` times, resuming from the latest checkpoint."""
    import dataclasses

    unscored = dataclasses.replace(surveyed, evaluation=[], eval_corpus={})

    def work(rank: int, world: int, device: str, barrier) -> int:
        encoding.set_torch_threads(cfg.runtime.cpus_per_worker)
        mine = dataclasses.replace(saved, rank=rank, barrier=barrier)
        model, history = training.fit(
            cfg.train,
            cfg.model,
            table,
            surveyed if rank == 0 else unscored,
            rank,
            world,
            training.average_gradients,
            on_epoch=_log_epoch if rank == 0 else None,
            saved=mine,
            device=device,
        )
        if rank == 0:
            save_model(model, output, cfg)
            storage.write_json_atomic(storage.join(output, "_history.json"), history, cfg.output.storage_options)
        return history["steps"]

    ray_training.run_on_train_workers(cfg.runtime, work, _train_storage(cfg))
    return storage.read_json(storage.join(output, "_history.json"), cfg.output.storage_options)


def _train_storage(cfg: Config) -> dict:
    """RunConfig's storage arguments: Ray Train's run directory under output.root (absolute when local), shared by
    every node; on other storage, with a pyarrow file system wrapping the fsspec one, so that it is reached with
    output.storage_options (pyarrow's own S3 client would know neither those credentials nor the endpoint)."""
    url = storage.join(cfg.output.root, "_ray_train")
    local = storage.local_path(url, cfg.output.storage_options)
    if local:
        return {"storage_path": os.path.abspath(local)}
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(url, cfg.output.storage_options)
    return {"storage_path": path, "storage_filesystem": PyFileSystem(FSSpecHandler(fs))}


def save_model(model, output: str, cfg: Config) -> None:
    """Save a SentenceTransformer to a local path directly, or through a temp dir to any fsspec URL (file by
    file; ``training.json``, written after, is the training's commit record)."""
    storage_options = cfg.output.storage_options
    local = storage.local_path(output, storage_options)
    if local:
        model.save(local)
        training.mark_matryoshka(local, cfg.train)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        training.mark_matryoshka(tmp, cfg.train)
        storage.upload_dir(tmp, output, storage_options)


def format_summary(record: dict) -> str:
    evaluations = record["history"]["evaluations"]
    first, last = evaluations[0]["ndcg@10"], evaluations[-1]["ndcg@10"]
    state = "already trained" if record["reused"] else f"in {record['seconds']} s"
    return (
        f"train: {record['examples']} examples, {record['history']['steps']} steps, held-out nDCG@10 "
        f"{first} -> {last}; model at {record['output']} ({state})"
    )


def main(argv: list[str] | None = None) -> int:
    return _cli.run_job(__doc__, run, format_summary, argv, KEYS)


if __name__ == "__main__":
    sys.exit(main())
