"""Model families: which prompts a model's documents and queries get, and which model encodes the queries.

The prompt applied to a side (documents or queries) is, first match wins:
1. ``model.document_prompt`` / ``model.query_prompt`` when set (not null; ``""`` means no prompt);
2. the model's own prompts (``config_sentence_transformers.json``: ``query``; ``document``, ``passage`` or
   ``corpus``), as their authors intended;
3. the family's preset (``model.family``, or the family ``auto`` infers from a well-known name), for models that do
   not ship their prompts.
Nothing here loads a model: the prompts are read from the model's files, so a driver fingerprints them cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from retrieval_core.config import ModelConfig
from retrieval_core.config.schema import MODEL_FAMILIES

BGE_EN_QUERY = "Represent this sentence for searching relevant passages: "
BGE_ZH_QUERY = "为这个句子生成表示以用于检索相关文章："


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    query_prompt: str = ""
    document_prompt: str = ""
    separate_query_encoder: bool = False
    note: str = ""


FAMILIES = {
    "e5": Family("e5", "query: ", "passage: ", note="E5 (intfloat/e5-*): prefixes on both sides"),
    "bge": Family("bge", BGE_EN_QUERY, "", note="BGE English (BAAI/bge-*-en*): an instruction on queries only"),
    "bge-zh": Family("bge-zh", BGE_ZH_QUERY, "", note="BGE Chinese (BAAI/bge-*-zh*): the Chinese query instruction"),
    "gte": Family("gte", note="GTE (thenlper/gte-*, Alibaba-NLP/gte-*): no prompts"),
    "dpr": Family(
        "dpr",
        separate_query_encoder=True,
        note="DPR: a context encoder (model.name) and a question encoder (model.query_name)",
    ),
    "plain": Family("plain", note="no prompts beyond the model's own"),
}
assert MODEL_FAMILIES == ("auto", *FAMILIES)
DOCUMENT_PROMPT_KEYS = ("document", "passage", "corpus")


def infer_family(name: str) -> str:
    """The family of a well-known model name (the last parts of a path or hub id), else ``plain``."""
    base = name.rstrip("/").lower()
    base = "/".join(base.split("/")[-2:])
    if "instruct" in base or "mistral" in base:  # instruction-tuned variants have prompts of another form
        return "plain"
    if re.search(r"(^|[/_-])e5[_-]", base):
        return "e5"
    if re.search(r"bge-[a-z0-9.-]*zh", base):
        return "bge-zh"
    if re.search(r"bge-[a-z0-9.-]*en", base):
        return "bge"
    if re.search(r"(^|[/_-])gte[_-]", base):
        return "gte"
    if "dpr" in base or "ctx_encoder" in base:
        return "dpr"
    return "plain"


def family_of(cfg: ModelConfig) -> Family:
    return FAMILIES[infer_family(cfg.name) if cfg.family == "auto" else cfg.family]


def query_model_name(cfg: ModelConfig) -> str:
    """The model that encodes queries: ``model.query_name``, else for DPR the question encoder paired with a
    ``ctx_encoder`` name, else ``model.name``."""
    if cfg.query_name:
        return cfg.query_name
    family = family_of(cfg)
    if family.separate_query_encoder:
        if "ctx_encoder" in cfg.name:
            return cfg.name.replace("ctx_encoder", "question_encoder")
        raise ValueError(
            f"model.family = {family.name!r} encodes queries with a model of their own: set "
            f"model.query_name (model.name = {cfg.name!r} is the document encoder)"
        )
    return cfg.name


def shipped_prompts(model_dir: str | None) -> dict[str, str]:
    """The prompts a model directory ships in ``config_sentence_transformers.json`` (empty when none, and for an
    embedding API, which has no directory: ``None``)."""
    if model_dir is None:
        return {}
    path = Path(model_dir) / "config_sentence_transformers.json"
    if not path.is_file():
        return {}
    return {k: v for k, v in (json.loads(path.read_text()).get("prompts") or {}).items() if v}


def document_prompt(cfg: ModelConfig, model_dir: str | None) -> str:
    if cfg.document_prompt is not None:
        return cfg.document_prompt
    shipped = shipped_prompts(model_dir)
    key = next((k for k in DOCUMENT_PROMPT_KEYS if k in shipped), None)
    return shipped[key] if key else family_of(cfg).document_prompt


def query_prompt(cfg: ModelConfig, query_model_dir: str | None) -> str:
    if cfg.query_prompt is not None:
        return cfg.query_prompt
    return shipped_prompts(query_model_dir).get("query") or family_of(cfg).query_prompt


# Models published as trained with a Matryoshka loss (their first dimensions are a usable embedding on their own);
# other models say so in their model card (README.md), as sentence-transformers writes it for MatryoshkaLoss and
# this project's training does for train.matryoshka_dims.
MATRYOSHKA_NAMES = (
    "nomic-embed-text-v1.5",
    "mxbai-embed-large-v1",
    "snowflake-arctic-embed-m-v1.5",
    "snowflake-arctic-embed-l-v2.0",
    "jina-embeddings-v3",
    "embeddinggemma",
    "qwen3-embedding",
    "gte-modernbert",
)
MATRYOSHKA_MARK = "matryoshkaloss"  # the loss's name: every model card links a Matryoshka blog post


def trained_for_truncation(name: str, model_dir: str) -> bool:
    """The model was trained so that its first dimensions stand on their own: a well-known Matryoshka model, or one
    whose model card names MatryoshkaLoss (sentence-transformers' cards name the training loss)."""
    if any(known in name.lower() for known in MATRYOSHKA_NAMES):
        return True
    card = Path(model_dir) / "README.md"
    return card.is_file() and MATRYOSHKA_MARK in card.read_text(errors="replace").lower()


def check_truncation(cfg: ModelConfig, name: str, model_dir: str) -> None:
    """Refuse ``model.truncate_dim`` for a model not trained for it (its truncated vectors lose much of their
    quality without a word), unless ``model.force_truncate``."""
    if cfg.truncate_dim and not cfg.force_truncate and not trained_for_truncation(name, model_dir):
        raise ValueError(
            f"model.truncate_dim = {cfg.truncate_dim}: model {name!r} is not known to be trained for truncation "
            f"(Matryoshka: neither a known Matryoshka model nor its model card says so), and its first "
            f"{cfg.truncate_dim} dimensions may rank much worse than all of them; set model.force_truncate: true to "
            f"truncate anyway (measure it with jobs.evaluate), or train one with train.matryoshka_dims"
        )
