"""The shape of a job configuration: one frozen dataclass per section, the allowed values of its enumerated
settings, and the dotted keys a user may set.

Every key a user can set is a field below; ``configs/demo.yaml`` lists them all with their defaults.
Unknown keys are errors that suggest the closest valid key (:func:`unknown_key_error`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Union

MODEL_PROVIDERS = ("local", "openai", "cohere")  # local: sentence-transformers; else retrieval_core.encode.providers
MODEL_FAMILIES = ("auto", "e5", "bge", "bge-zh", "gte", "dpr", "plain")  # presets in retrieval_core.encode.families
PRECISIONS = ("fp32", "bf16", "fp16")
CORPUS_FORMATS = ("", "parquet", "jsonl")
EMBEDDING_DTYPES = ("float32", "float16")
METRICS = ("ip", "l2")
SAMPLINGS = ("top", "random")
MINE_MODES = ("replicated", "sharded")
MINE_FORMATS = ("triplet", "n-tuple", "flag-jsonl")
PIPELINE_STAGES = ("encode", "index", "evaluate", "mine", "train", "reencode", "reindex", "reevaluate")
RETRAIN_MODES = ("auto", "always", "never")
DEFAULT_MODEL = "all-MiniLM-L6-v2"
REDACTED = "<redacted>"


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and what was expected."""


@dataclass(frozen=True)
class CorpusConfig:
    path: Union[str, list] = "examples/demo/corpus.parquet"
    format: str = ""
    id_column: str = "id"
    text_column: str = "text"
    title_column: Union[str, None] = None
    max_text_chars: int = 1_000_000
    storage_options: dict = field(default_factory=dict, repr=False)  # credentials: never in a repr


@dataclass(frozen=True)
class ModelConfig:
    name: str = DEFAULT_MODEL
    precision: str = "fp32"
    batch_size: int = 32
    max_seq_length: Union[int, None] = None
    normalize: bool = True
    family: str = "auto"
    document_prompt: Union[str, None] = None
    query_prompt: Union[str, None] = None
    query_name: str = ""
    truncate_dim: Union[int, None] = None
    trust_remote_code: bool = False
    provider: str = "local"
    base_url: str = ""
    api_key_env: str = ""
    max_concurrency: int = 4
    max_retries: int = 6
    timeout: float = 60.0
    max_input_chars: int = 0
    # fsspec options when name is a URL; left out of the hash (a dict has none), so the config stays a cache key,
    # and of the repr (credentials)
    storage_options: dict = field(default_factory=dict, hash=False, repr=False)


@dataclass(frozen=True)
class OutputConfig:
    root: str = "out/demo"
    version: str = ""
    overwrite: bool = False
    embedding_dtype: str = "float32"
    storage_options: dict = field(default_factory=dict, repr=False)  # credentials: never in a repr


@dataclass(frozen=True)
class RuntimeConfig:
    address: str = ""
    num_cpus: int = 0
    num_workers: int = 0
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    rows_per_shard: int = 0
    max_restarts: int = 3
    max_task_retries: int = 3
    speculation: float = 3.0
    inline_rows: int = 2048
    progress: Union[bool, str] = "auto"


@dataclass(frozen=True)
class IndexConfig:
    type: str = "auto"
    metric: str = "ip"
    max_memory: str = "8GB"
    train_size: int = 0
    seed: int = 0
    on_disk: bool = False
    target_recall: float = 0.95
    recall_queries: int = 1000
    nprobe: int = 0
    ef_search: int = 0


@dataclass(frozen=True)
class SearchConfig:
    k: int = 10
    batch_size: int = 1024


@dataclass(frozen=True)
class EvalConfig:
    queries_path: str = "examples/demo/queries.jsonl"
    qrels_path: str = "examples/demo/qrels.tsv"
    storage_options: dict = field(default_factory=dict, repr=False)  # credentials: never in a repr
    depth: int = 100


@dataclass(frozen=True)
class MineConfig:
    pairs_path: str = "examples/demo/pairs.jsonl"
    queries_path: str = ""
    qrels_path: str = ""
    format: str = ""
    query_column: str = "query"
    positive_column: str = "positive"
    query_id_column: str = ""
    storage_options: dict = field(default_factory=dict, repr=False)  # credentials: never in a repr
    range_min: int = 0
    range_max: int = 0
    max_score: Union[float, None] = None
    min_score: Union[float, None] = None
    absolute_margin: Union[float, None] = None
    relative_margin: Union[float, None] = 0.05
    sampling: str = "top"
    num_negatives: int = 3
    seed: int = 0
    keep_incomplete: bool = True
    mode: str = "replicated"
    formats: list = field(default_factory=lambda: ["triplet", "n-tuple", "flag-jsonl"])
    output_scores: bool = False
    queries_per_part: int = 10000
    input_mb_per_bucket: float = 256.0
    cross_encoder: str = ""
    cross_encoder_batch_size: int = 32
    cross_encoder_max_length: Union[int, None] = None
    cross_encoder_precision: str = "fp32"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    max_steps: int = 0
    num_negatives: int = 3
    temperature: float = 0.05
    cached: bool = False
    mini_batch_size: int = 32
    seed: int = 0
    eval_fraction: float = 0.1
    eval_corpus_size: int = 2000
    checkpoint_steps: int = 500
    output: str = ""


@dataclass(frozen=True)
class PipelineConfig:
    stages: list = field(default_factory=lambda: list(PIPELINE_STAGES))


@dataclass(frozen=True)
class RefreshConfig:
    retrain: str = "auto"
    retrain_drift: float = 0.1
    diff_buckets: int = 0
    inline_snapshot_rows: int = 200_000


@dataclass(frozen=True)
class PublishConfig:
    min_recall: float = 0.9
    max_reject_fraction: float = 0.01
    max_deleted_fraction: float = 0.1
    max_added_fraction: float = 0.5
    max_ndcg_drop: float = 0.02
    keep_versions: int = 3
    keep_failed: int = 3
    lease_expiry: int = 600
    lease_renew: int = 60


@dataclass(frozen=True)
class Config:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def to_dict(self) -> dict:
        """The config as written into plans, manifests and records: every ``storage_options`` keeps its keys but
        its values read ``<redacted>``, so credentials never reach a file the jobs write."""
        return redact_storage_options(dataclasses.asdict(self))


def redact_storage_options(data: Any) -> Any:
    """A copy of ``data`` (a dict or list, nested) whose ``storage_options`` mappings keep their keys with every
    value replaced by ``<redacted>``."""
    if isinstance(data, dict):
        return {
            k: (
                {name: REDACTED for name in v}
                if k == "storage_options" and isinstance(v, dict)
                else redact_storage_options(v)
            )
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact_storage_options(v) for v in data]
    return data


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted keys a user may set, e.g. ``model.batch_size``."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(valid_keys(hint, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def default_value(key: str) -> Any:
    """The built-in default of a dotted key, e.g. ``default_value('model.batch_size') == 32``."""
    if key not in valid_keys():
        raise unknown_key_error(key)
    node: Any = Config()
    for part in key.split("."):
        node = getattr(node, part)
    return node


RENAMED_KEYS = {
    "publish.lock_timeout": "publish.lease_expiry (seconds a lease may go unrenewed before another "
    "process takes it over; the holder renews it every publish.lease_renew)"
}


def unknown_key_error(key: str) -> ConfigError:
    if key in RENAMED_KEYS:
        return ConfigError(f"config key '{key}' is gone: use {RENAMED_KEYS[key]}")
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid_keys())}"
    return ConfigError(f"unknown config key '{key}'{hint}")
