"""Run the whole pipeline from one config in one Ray session (none when every stage runs in this process).

Stages, in this order (pipeline.stages selects): encode -> index -> evaluate -> mine -> train -> reencode ->
reindex -> reevaluate. Each reads and writes what its own job does (python -m jobs.<stage> --help), under
output.root; the re* stages use the trained model (train.output) and write under <output.root>/trained/.
Every stage resumes from its own manifest, so a pipeline stopped anywhere and run again finishes with a clean run's
result; stages with nothing left to do are reused and marked so in the summary table.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

from jobs import _cli, encode, evaluate, index, mine, train
from jobs.ray import cluster
from retrieval_core.config import PIPELINE_STAGES, Config
from retrieval_core.io import storage
from retrieval_core.train import examples, training

log = logging.getLogger("jobs.pipeline")
KEYS = (
    "pipeline.stages",
    "corpus.path",
    "model.name",
    "output.root",
    "index.type",
    "eval.queries_path",
    "mine.pairs_path",
    "mine.relative_margin",
    "train.epochs",
    "runtime.num_workers",
)  # for --help


def trained_config(cfg: Config) -> Config:
    """The config of the re-* stages: the trained model (read with output.storage_options, which saved it), outputs
    under ``<output.root>/trained``."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name=train.output_of(cfg), storage_options=cfg.output.storage_options),
        output=dataclasses.replace(cfg.output, root=storage.join(cfg.output.root, "trained")),
    )


def _stage_runs(cfg: Config) -> dict:
    trained = trained_config(cfg)
    return {
        "encode": lambda: encode.run(cfg),
        "index": lambda: index.run(cfg),
        "evaluate": lambda: evaluate.run(cfg),
        "mine": lambda: mine.run(cfg),
        "train": lambda: train.run(cfg),
        "reencode": lambda: encode.run(trained),
        "reindex": lambda: index.run(trained),
        "reevaluate": lambda: evaluate.run(trained),
    }


TRAINING_STAGES = {"train", "reencode", "reindex", "reevaluate"}


def run(cfg: Config) -> dict:
    """Run the selected stages in order; returns {stage: (result, seconds)}."""
    if TRAINING_STAGES & set(cfg.pipeline.stages):  # refused before any stage runs, not after hours of them
        training.check_trainable(cfg.model)
    if "train" in cfg.pipeline.stages:
        examples.check_mined_for_training(cfg.mine.formats)
    runs = _stage_runs(cfg)
    results = {}
    with cluster.kept_session():  # Ray starts with the first stage that needs it, and serves the rest
        for stage in (s for s in PIPELINE_STAGES if s in cfg.pipeline.stages):
            started = time.perf_counter()
            log.info("stage %s", stage)
            results[stage] = (runs[stage](), round(time.perf_counter() - started, 1))
    return results


def summary_rows(results: dict) -> list[tuple[str, str, float, bool]]:
    """(stage, what it did, seconds, reused) for the summary table."""
    describe = {
        "encode": lambda r: f"{r['rows_encoded']} rows, {r['rows_rejected']} rejected, {r['shards']} shards",
        "index": lambda r: f"{r['type']}, {r['ntotal']} vectors, recall@10 {r['recall_at_10']}",
        "evaluate": lambda r: (
            f"nDCG@10 {r['metrics']['ndcg@10']:.4f}, recall@100 {r['metrics']['recall@100']:.4f}, "
            f"MRR@10 {r['metrics']['mrr@10']:.4f}"
        ),
        "mine": lambda r: f"{r['written']} queries with negatives ({r['complete']} complete)",
        "train": lambda r: (
            f"{r['history']['steps']} steps, held-out nDCG@10 "
            f"{r['history']['evaluations'][0]['ndcg@10']} -> "
            f"{r['history']['evaluations'][-1]['ndcg@10']}"
        ),
    }
    describe["reencode"], describe["reindex"], describe["reevaluate"] = (
        describe["encode"],
        describe["index"],
        describe["evaluate"],
    )
    return [
        (stage, describe[stage](result), seconds, bool(result.get("reused")))
        for stage, (result, seconds) in results.items()
    ]


def format_table(rows: list[tuple[str, str, float, bool]]) -> str:
    """The summary table; a stage that found its output complete says ``reused`` beside its time."""
    width = max(len(text) for _, text, _, _ in rows)
    lines = [f"{'stage':<11} {'result':<{width}} {'seconds':>8}", "-" * (28 + width)]
    lines += [
        f"{stage:<11} {text:<{width}} {seconds:>8.1f}{' reused' if reused else ''}"
        for stage, text, seconds, reused in rows
    ]
    lines.append(f"{'total':<11} {'':<{width}} {sum(row[2] for row in rows):>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return _cli.run_job(__doc__, run, lambda results: format_table(summary_rows(results)), argv, KEYS)


if __name__ == "__main__":
    sys.exit(main())
