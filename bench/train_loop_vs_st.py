"""Benchmark: this project's contrastive training loop (``training.fit``) against sentence-transformers'
``SentenceTransformerTrainer``, on identical examples, side by side.

What it measures
  * The same (query, positive, negatives) examples go to both loops. They are synthesized, not mined: each SciFact
    train query (qrels/train.tsv) with each of its positive abstracts (title + " " + text) and ``--negatives``
    random other abstracts (seeded) -- or the bundled demo corpus (examples/demo) when SciFact is absent.
  * Both loops: the same model (default: the packaged all-MiniLM-L6-v2), MultipleNegativesRankingLoss with
    scale 20 (train.temperature 0.05), batch ``--batch-size``, lr ``--learning-rate``, linear warmup over 10% of the
    steps then linear decay, torch AdamW (weight decay 0.01, torch's default, which ``fit`` uses), no gradient
    clipping (``fit`` has none, so the Trainer's max_grad_norm is set to 0), ``--steps`` optimizer steps, fp32,
    ``torch.set_num_threads(--threads)``, the same seed, no evaluation during training, no checkpoints.
  * ours: ``training.fit(cfg.train, cfg.model, table, survey)`` over the examples written as an n-tuple table (the
    mine's export format), streamed as a training reads it, with an empty survey (no held-out examples: its
    evaluations are no-ops); batches from ``examples.epoch_batches`` (no query twice in a batch, last partial batch
    dropped).
  * Trainer: ``SentenceTransformerTrainer`` with ``batch_sampler=BatchSamplers.NO_DUPLICATES``,
    ``dataloader_drop_last=True``, ``optim="adamw_torch"``, ``save_strategy="no"``, ``eval_strategy="no"``,
    ``report_to="none"``, ``logging_steps=1`` (to read each step's loss; the console printer is removed).
  Each loop runs in its own Python process (so peak RSS is its own), one after the other. Reported per loop: the
  seconds of model load + setup (ours: the prompt resolution ``fit`` would do in its first step -- it hashes the
  model files -- plus ``fit``'s wall time less its own training clock; Trainer: model load plus Trainer
  construction), the seconds of the training steps (ours: ``history["seconds"]``; Trainer: wall time of
  ``trainer.train()``), steps/s, first loss, mean loss of the last 5 steps, peak RSS (``ru_maxrss``) of the
  process; and the ratio Trainer train seconds / our train seconds.

Caveats
  * The batches differ: ``epoch_batches`` shuffles with Python's ``random`` and groups by query id; the Trainer's
    NO_DUPLICATES sampler shuffles with torch and refuses any repeated text in a batch (any column). Losses are
    therefore comparable in level and trend only, not step for step. Dropout draws differ too.
  * Warmup: ``fit``'s schedule starts at lr x 1/warmup on step 1; transformers' starts at 0. The Trainer leaves
    biases and LayerNorm weights out of weight decay; ``fit`` decays every parameter.
  * On a shared, busy CPU the seconds are noisy; compare the ratio of runs made back to back. When another process
    holds the cores, ``--threads`` equal to the core count makes torch's OpenMP threads wait on each other (on 2
    cores at load average ~4, one fwd+bwd+AdamW step took ~6x longer with 2 threads than with 1): the absolute
    seconds are then inflated for both loops alike. The load average at the start is printed and saved.
  * SciFact abstracts are long: at the model's own 256 tokens a step of batch 32 with 3 negatives (160 texts) takes
    tens of seconds on 2 cores; ``--max-seq-length`` caps both loops alike for a quick comparison.

Needs ``accelerate`` (the Trainer does; the project does not): without it this exits 0 with a message.
  pip install accelerate      # or, beside an existing venv: pip install --target /tmp/accel accelerate

Run (from the repository root, with the venv active)
  python bench/train_loop_vs_st.py              # SciFact ($SCIFACT_DIR or ../shared/data/scifact), else the demo
  python bench/train_loop_vs_st.py --steps 20 --batch-size 32 --max-seq-length 64 --out train_loops.json
  Other options: --model (name or local directory), --negatives 3, --learning-rate 2e-5, --threads 2, --seed 0,
  --loops ours,trainer (order of the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("SCIFACT_DIR") or REPO.parent / "shared" / "data" / "scifact")  # BEIR SciFact
DEMO = REPO / "examples" / "demo"
MODEL = "all-MiniLM-L6-v2"
TEMPERATURE = 0.05  # MultipleNegativesRankingLoss scale 20
WARMUP_RATIO = 0.1
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which fit uses
LAST = 5  # the final loss is the mean of the last LAST steps
LOOPS = ("ours", "trainer")

if str(REPO) not in sys.path:  # `python bench/train_loop_vs_st.py` puts bench/ on the path, not the repository
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged model only: never a download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"BEIR directory: corpus.jsonl, queries.jsonl, qrels/train.tsv (default: {SCIFACT} when "
        f"present, else {DEMO})",
    )
    p.add_argument("--model", default=MODEL, help="model name (the packaged default) or a local directory")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--negatives", type=int, default=3, help="random negatives per example")
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--max-seq-length", type=int, default=None, help="tokens (default: the model's own)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each loop's process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loops", default=",".join(LOOPS), help="which loops to run, in this order")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--child", choices=LOOPS, help=argparse.SUPPRESS)  # internal: run one loop in this process
    p.add_argument("--examples-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------- the data


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_qrels(path: Path) -> dict[str, list[str]]:
    qrels: dict[str, list[str]] = {}
    with open(path) as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0] == "query-id" or float(parts[2]) <= 0:
                continue
            qrels.setdefault(parts[0], []).append(parts[1])
    return qrels


def build_examples(data: Path, negatives: int, seed: int) -> list[dict]:
    """One example per (query, positive) of qrels/train.tsv (or qrels.tsv): query text, positive text and
    ``negatives`` random other documents (none of the query's positives), drawn with ``seed``."""
    from retrieval_core.io.corpus import assemble_text

    corpus = {
        str(row.get("_id", row.get("id"))): assemble_text(row.get("title"), row.get("text", ""))
        for row in read_jsonl(data / "corpus.jsonl")
    }
    queries = {str(row.get("_id", row.get("id"))): row["text"] for row in read_jsonl(data / "queries.jsonl")}
    qrels_path = data / "qrels" / "train.tsv"
    qrels = read_qrels(qrels_path if qrels_path.exists() else data / "qrels.tsv")
    ids = sorted(corpus)
    rng = random.Random(seed)
    examples = []
    for qid in sorted(qrels):
        positives = [d for d in qrels[qid] if d in corpus]
        if qid not in queries or not positives:
            continue
        for doc in positives:
            drawn: list[str] = []
            while len(drawn) < negatives:
                pick = ids[rng.randrange(len(ids))]
                if pick not in qrels[qid] and pick not in drawn:
                    drawn.append(pick)
            examples.append(
                {
                    "query_id": qid,
                    "query": queries[qid],
                    "positive": corpus[doc],
                    "negatives": [corpus[d] for d in drawn],
                }
            )
    return examples


# ------------------------------------------------------------------------------------------ the loops (one each)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def run_ours(args, examples: list[dict]) -> dict:
    from retrieval_core.config import load_config
    from retrieval_core.train import examples as train_examples
    from retrieval_core.train import training

    q = json.dumps
    overrides = [
        f"corpus.path={q(str(args.data / 'corpus.jsonl'))}",
        f"output.root={q(str(args.examples_file.parent / 'ours-root'))}",
        "runtime.progress=false",
        f"model.name={q(args.model)}",
        "model.precision=fp32",
        f"train.batch_size={args.batch_size}",
        f"train.learning_rate={args.learning_rate}",
        f"train.warmup_ratio={WARMUP_RATIO}",
        f"train.max_steps={args.steps}",
        f"train.num_negatives={args.negatives}",
        f"train.temperature={TEMPERATURE}",
        "train.cached=false",
        f"train.seed={args.seed}",
        "train.checkpoint_steps=0",
        "train.eval_fraction=0",
    ]
    if args.max_seq_length:
        overrides.append(f"model.max_seq_length={args.max_seq_length}")
    cfg = load_config(None, overrides)
    table = ntuple_table(args.examples_file.parent / "ours-n-tuple.parquet", examples, args.negatives, args.seed)
    surveyed = train_examples.Survey(len(examples), 0, [], {})  # nothing held out: evaluations are no-ops
    # imported before the clock, as the Trainer's process imports them before its own
    from sentence_transformers import SentenceTransformer  # noqa: F401
    from sentence_transformers.sentence_transformer import losses  # noqa: F401

    started = time.perf_counter()
    # fit resolves the prompts (hashing the model's files for its fingerprint, cached) in its first step: a
    # one-time setup cost, paid here so that it counts as setup, not as training steps
    training.resolved_prompts(cfg.model)
    prompts_s = time.perf_counter() - started
    _, history = training.fit(cfg.train, cfg.model, table, surveyed)
    wall = time.perf_counter() - started
    train_s = history["seconds"]
    return {
        "setup_s": round(wall - train_s, 3),
        "prompts_s": round(prompts_s, 3),
        "train_s": round(train_s, 3),
        "losses": history["losses"],
        "steps": len(history["losses"]),
    }


def ntuple_table(path: Path, examples: list[dict], negatives: int, seed: int):
    """``examples`` written as the mine's n-tuple export, as training reads it (nothing held out)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retrieval_core.mine import exports
    from retrieval_core.train.examples import TrainingTable

    columns = {"anchor": [e["query"] for e in examples], "positive": [e["positive"] for e in examples]}
    columns |= {f"negative_{i + 1}": [e["negatives"][i] for e in examples] for i in range(negatives)}
    table = pa.table(columns).cast(exports.ntuple_schema(negatives, False))
    with pq.ParquetWriter(str(path), table.schema) as writer:
        for start, stop in exports.query_groups(columns["anchor"], exports.NTUPLE_GROUP_ROWS):
            writer.write_table(table.slice(start, stop - start))
    return TrainingTable(str(path), negatives, seed, 0.0, 10_000)


def run_trainer(args, examples: list[dict]) -> dict:
    import torch  # noqa: F401
    import transformers
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    from transformers import PrinterCallback, TrainerCallback

    from retrieval_core.encode.model_files import resolve_model_path

    transformers.logging.set_verbosity_error()
    losses: list[float] = []

    class StepLosses(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 5))

    started = time.perf_counter()
    model = SentenceTransformer(resolve_model_path(args.model), device="cpu")
    if args.max_seq_length:
        model.max_seq_length = args.max_seq_length
    load_s = time.perf_counter() - started
    columns = {"anchor": [e["query"] for e in examples], "positive": [e["positive"] for e in examples]}
    for i in range(args.negatives):
        columns[f"negative_{i + 1}"] = [e["negatives"][i] for e in examples]
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(args.examples_file.parent / "trainer-out"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP_RATIO,  # a float < 1 is a ratio in transformers 5
        optim="adamw_torch",
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=0.0,
        seed=args.seed,
        data_seed=args.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        fp16=False,
        bf16=False,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict(columns),
        loss=MultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE),
        callbacks=[StepLosses()],
    )
    trainer.remove_callback(PrinterCallback)
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    output = trainer.train()
    train_s = time.perf_counter() - started
    return {
        "setup_s": round(setup_s, 3),
        "load_s": round(load_s, 3),
        "train_s": round(train_s, 3),
        "train_runtime": output.metrics.get("train_runtime"),
        "losses": losses,
        "steps": trainer.state.global_step,
    }


def child(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    examples = json.loads(args.examples_file.read_text())
    result = (run_ours if args.child == "ours" else run_trainer)(args, examples)
    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_threads"] = torch.get_num_threads()
    args.result_file.write_text(json.dumps(result))
    return 0


# -------------------------------------------------------------------------------------------------- the driver


def accelerate_missing() -> str | None:
    """Why the Trainer cannot run here (None when it can)."""
    try:
        from transformers.utils import is_accelerate_available
    except ImportError as exc:
        return f"transformers is not importable ({exc})"
    if not is_accelerate_available():
        return "SentenceTransformerTrainer needs accelerate (>= 1.1.0), which is not importable"
    return None


def summarize(name: str, result: dict) -> dict:
    losses = result["losses"]
    steps = result["steps"]
    return {
        "loop": name,
        "setup_s": result["setup_s"],
        "train_s": result["train_s"],
        "steps": steps,
        "steps_per_s": round(steps / result["train_s"], 4) if result["train_s"] else None,
        "s_per_step": round(result["train_s"] / steps, 3) if steps else None,
        "first_loss": losses[0] if losses else None,
        "last5_loss": round(sum(losses[-LAST:]) / len(losses[-LAST:]), 4) if losses else None,
        "peak_rss_mb": result["peak_rss_mb"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.data is None:
        args.data = SCIFACT if (SCIFACT / "corpus.jsonl").exists() else DEMO
    if args.child:
        return child(args)
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    unknown = [name for name in loops if name not in LOOPS]
    if unknown or not loops:
        print(f"--loops {args.loops!r}: expected a comma-separated list of {', '.join(LOOPS)}", file=sys.stderr)
        return 2
    if "trainer" in loops and (why := accelerate_missing()):
        print(f"skipped: {why}; pip install accelerate")
        return 0
    if not (args.data / "corpus.jsonl").exists() or not (args.data / "queries.jsonl").exists():
        print(f"skipped: no corpus.jsonl / queries.jsonl in {args.data}")
        return 0
    examples = build_examples(args.data, args.negatives, args.seed)
    if len(examples) < args.batch_size:
        print(f"skipped: {len(examples)} examples in {args.data}, fewer than one batch of {args.batch_size}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-train-loops-"))
    (work / "examples.json").write_text(json.dumps(examples))
    load_at_start = os.getloadavg()[0]
    print(
        f"{len(examples)} examples from {args.data} ({len({e['query_id'] for e in examples})} queries, "
        f"{args.negatives} random negatives each); model {args.model}, {args.steps} steps of {args.batch_size}, "
        f"lr {args.learning_rate}, max_seq_length {args.max_seq_length or 'model default'}, "
        f"{args.threads} torch threads; load average {load_at_start:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    forwarded = list(argv if argv is not None else sys.argv[1:])
    rows, raw = [], {}
    for name in loops:
        result_file = work / f"{name}.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *forwarded,
            "--data",
            str(args.data),
            "--child",
            name,
            "--examples-file",
            str(work / "examples.json"),
            "--result-file",
            str(result_file),
        ]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO)
        if done.returncode != 0 or not result_file.exists():
            print(f"{name}: failed (exit {done.returncode})", file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)
            return 1
        raw[name] = json.loads(result_file.read_text())
        raw[name]["process_s"] = round(time.perf_counter() - started, 3)
        rows.append(summarize(name, raw[name]))
        print(f"{name}: {raw[name]['train_s']:.1f} s for {raw[name]['steps']} steps", flush=True)
    labels = {"ours": "ours (training.fit)", "trainer": "SentenceTransformerTrainer"}
    print("\n| loop | load+setup s | train s | steps | steps/s | s/step | first loss | last-5 loss | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {labels[row['loop']]} | {row['setup_s']:.1f} | {row['train_s']:.1f} | {row['steps']} | "
            f"{row['steps_per_s']:.3f} | {row['s_per_step']:.2f} | {row['first_loss']} | {row['last5_loss']} | "
            f"{row['peak_rss_mb']:.0f} |"
        )
    ratio = None
    if "ours" in raw and "trainer" in raw and raw["ours"]["train_s"]:
        ratio = round(raw["trainer"]["train_s"] / raw["ours"]["train_s"], 3)
        print(f"\nTrainer train time / our train time: {ratio:.2f}x")
    shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "ratio_trainer_over_ours": ratio,
                    "raw": raw,
                    "examples": len(examples),
                    "loadavg_at_start": load_at_start,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
