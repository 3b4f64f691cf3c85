"""Job configuration: frozen dataclasses loaded from YAML plus dotted ``--set`` overrides.

Every key a user can set is a field below; ``configs/demo.yaml`` lists them all with their defaults.
Unknown keys are errors that suggest the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

MODEL_PROVIDERS = ("local", "openai", "cohere")  # local: sentence-transformers; else retrieval_core.providers
MODEL_FAMILIES = ("auto", "e5", "bge", "bge-zh", "gte", "dpr", "plain")  # presets in retrieval_core.families
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
    progress: bool = True


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
    lock_timeout: int = 21600


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
        return {k: ({name: REDACTED for name in v} if k == "storage_options" and isinstance(v, dict)
                    else redact_storage_options(v)) for k, v in data.items()}
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
        raise _unknown_key_error(key)
    node: Any = Config()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _unknown_key_error(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid_keys())}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"'{key}' = {value!r}: expected {_type_name(hint)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' = {value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' = {value!r}: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' = {value!r}: expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' = {value!r}: expected a string")
    if hint in (list, dict):
        if isinstance(value, hint):
            return value
        shown = REDACTED if key.endswith("storage_options") else repr(value)  # it may hold credentials
        raise ConfigError(f"'{key}' = {shown}: expected a {hint.__name__}")
    raise ConfigError(f"'{key}': unsupported type {hint}")  # pragma: no cover - a programming error


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    return names + (" or null" if type(None) in typing.get_args(hint) else "")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key_error(f"{prefix}{key}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """``'model.batch_size=64'`` -> ``('model.batch_size', 64)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(data: dict, key: str, value: Any) -> None:
    """Set a dotted key inside a nested dict, refusing unknown keys."""
    if key not in valid_keys():
        raise _unknown_key_error(key)
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{part}' in '{key}' is not a section")
    node[leaf] = value


def read_yaml(path: str) -> dict:
    """A config file as a dict, with environment variables expanded in its strings (see :func:`expand_env`)."""
    import fsspec

    try:
        with fsspec.open(path, "r") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text: {exc}") from None
    return expand_env(data or {}, path)


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


def expand_env(value: Any, source: str) -> Any:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` in every string of a loaded config, as a
    shell would: an unset or empty VAR is an error naming it (with the message, for ``:?``), or the default."""
    if isinstance(value, dict):
        return {key: expand_env(item, source) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_env(item, source) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, operator, word = match.groups()
        found = os.environ.get(name, "")
        if found:
            return found
        if operator == ":-":
            return word
        hint = f": {word.strip()}" if operator == ":?" and word.strip() else ""
        raise ConfigError(f"config file '{source}' uses ${{{name}}}, which is not set{hint}")

    return ENV_REFERENCE.sub(substitute, value)


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    data = read_yaml(path) if path else {}
    for text in overrides:
        apply_override(data, *parse_override(text))
    config = _build(Config, data)
    validate(config)
    return config


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: Config) -> None:
    """Check values that types alone cannot; each message names the key, the value and what is allowed."""
    c, m, o, r = config.corpus, config.model, config.output, config.runtime
    _check(bool(c.path), "'corpus.path' is empty: give a file, directory, glob or list of them")
    _check(c.format in CORPUS_FORMATS, f"'corpus.format' = {c.format!r}: expected parquet, jsonl or empty (infer)")
    _check(bool(c.id_column), "'corpus.id_column' is empty")
    _check(bool(c.text_column), "'corpus.text_column' is empty")
    _check(c.max_text_chars >= 0, f"'corpus.max_text_chars' = {c.max_text_chars}: expected >= 0 (0 = no limit)")
    paths = c.path if isinstance(c.path, list) else [c.path]
    _check(all(isinstance(p, str) and p for p in paths),
           f"'corpus.path' = {c.path!r}: expected a path or URL, or a list of them (non-empty strings)")
    _check(bool(m.name.strip()), "'model.name' is empty: give the packaged default (all-MiniLM-L6-v2), a model "
           "directory or URL, a Hub name, or an API model name with model.provider")
    _check(m.precision in PRECISIONS, f"'model.precision' = {m.precision!r}: expected one of {', '.join(PRECISIONS)}")
    _check(m.batch_size > 0, f"'model.batch_size' = {m.batch_size}: expected a positive integer")
    _check(m.max_seq_length is None or m.max_seq_length > 0,
           f"'model.max_seq_length' = {m.max_seq_length}: expected a positive integer or null (the model's own)")
    _check(m.family in MODEL_FAMILIES, f"'model.family' = {m.family!r}: expected one of {', '.join(MODEL_FAMILIES)}")
    _check(m.truncate_dim is None or m.truncate_dim > 0,
           f"'model.truncate_dim' = {m.truncate_dim}: expected a positive integer or null (no truncation)")
    _validate_provider(m)
    _check(bool(o.root), "'output.root' is empty: give a directory or fsspec URL")
    _check(o.embedding_dtype in EMBEDDING_DTYPES,
           f"'output.embedding_dtype' = {o.embedding_dtype!r}: expected one of {', '.join(EMBEDDING_DTYPES)}")
    _check(r.num_cpus >= 0, f"'runtime.num_cpus' = {r.num_cpus}: expected >= 0 (0 = all cores)")
    _check(r.num_workers >= 0, f"'runtime.num_workers' = {r.num_workers}: expected >= 0 (0 = one per free slot)")
    _check(r.cpus_per_worker >= 1, f"'runtime.cpus_per_worker' = {r.cpus_per_worker}: expected >= 1")
    _check(r.gpus_per_worker >= 0, f"'runtime.gpus_per_worker' = {r.gpus_per_worker}: expected >= 0")
    _check(r.rows_per_shard >= 0, f"'runtime.rows_per_shard' = {r.rows_per_shard}: expected >= 0 (0 = automatic)")
    _check(r.max_restarts >= 0, f"'runtime.max_restarts' = {r.max_restarts}: expected >= 0")
    _check(r.max_task_retries >= 0, f"'runtime.max_task_retries' = {r.max_task_retries}: expected >= 0")
    _check(r.speculation == 0 or r.speculation >= 1,
           f"'runtime.speculation' = {r.speculation}: expected 0 (off) or a multiple >= 1 of the median shard time")
    _check(r.inline_rows >= 0, f"'runtime.inline_rows' = {r.inline_rows}: expected >= 0 (0 = always on actors)")
    _validate_index(config.index)
    _validate_search(config.search, config.eval)
    _validate_mine(config.mine)
    _validate_train(config.train, config.runtime)
    _validate_refresh(config.refresh, config.publish)
    unknown = [st for st in config.pipeline.stages if st not in PIPELINE_STAGES]
    _check(not unknown, f"'pipeline.stages' = {config.pipeline.stages!r}: unknown {unknown}; expected any of "
           f"{', '.join(PIPELINE_STAGES)}")


def parse_memory(text: str) -> int:
    """``'8GB'``, ``'512MB'``, ``'1.5GiB'`` or a plain number of bytes -> bytes (decimal and binary units alike)."""
    units = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    cleaned = str(text).strip().upper().replace("IB", "").rstrip("B")
    number = cleaned.rstrip("KMGT")
    unit = cleaned[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"'index.max_memory' = {text!r}: expected a size such as 8GB, 512MB or a number of bytes")
    if value <= 0:
        raise ConfigError(f"'index.max_memory' = {text!r}: expected a positive size")
    return int(value)


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LOCAL_ONLY = {"precision": "fp32", "max_seq_length": None, "query_name": "", "trust_remote_code": False}


def _validate_provider(m: ModelConfig) -> None:
    _check(m.provider in MODEL_PROVIDERS,
           f"'model.provider' = {m.provider!r}: expected one of {', '.join(MODEL_PROVIDERS)}")
    _check(m.max_concurrency >= 1, f"'model.max_concurrency' = {m.max_concurrency}: expected >= 1")
    _check(m.max_retries >= 0, f"'model.max_retries' = {m.max_retries}: expected >= 0")
    _check(m.timeout > 0, f"'model.timeout' = {m.timeout}: expected seconds > 0")
    _check(m.max_input_chars >= 0,
           f"'model.max_input_chars' = {m.max_input_chars}: expected >= 0 (0 = the provider's limit)")
    # the value is never shown: a key pasted here by mistake must not reach a log
    _check(not m.api_key_env or bool(ENV_NAME.fullmatch(m.api_key_env)),
           "'model.api_key_env' must name an environment variable (such as OPENAI_API_KEY) that holds the key, "
           "not hold the key itself; the value given is not a variable name and is not shown here")
    _check(not m.base_url or m.base_url.startswith(("http://", "https://")),
           f"'model.base_url' = {m.base_url!r}: expected an http:// or https:// URL, or empty (the provider's)")
    if m.provider == "local":
        return
    for key, default in LOCAL_ONLY.items():
        _check(getattr(m, key) == default, f"'model.{key}' = {getattr(m, key)!r} applies to local models only; "
               f"model.provider = {m.provider!r} is an embedding API: leave it at {default!r}")
    _check(m.family != "dpr", f"'model.family' = 'dpr' needs two local encoders; model.provider = {m.provider!r} "
           f"is an embedding API")


def _validate_index(ix: IndexConfig) -> None:
    _check(bool(ix.type.strip()), "'index.type' is empty: give a FAISS factory string such as Flat or IVF1024,Flat, "
           "or auto")
    _check(ix.metric in METRICS, f"'index.metric' = {ix.metric!r}: expected one of {', '.join(METRICS)}")
    for kind, count in re.findall(r"(IVF|HNSW)(\d+)", ix.type):  # FAISS builds these, then fails (or aborts)
        least = 1 if kind == "IVF" else 2
        _check(int(count) >= least, f"'index.type' = {ix.type!r}: {kind}{count} needs {kind}<n> with n >= {least}")
    parse_memory(ix.max_memory)
    _check(ix.train_size >= 0, f"'index.train_size' = {ix.train_size}: expected >= 0 (0 = automatic)")
    _check(0 < ix.target_recall <= 1, f"'index.target_recall' = {ix.target_recall}: expected a number in (0, 1]")
    _check(ix.recall_queries >= 0, f"'index.recall_queries' = {ix.recall_queries}: expected >= 0 (0 = skip)")
    _check(ix.nprobe >= 0, f"'index.nprobe' = {ix.nprobe}: expected >= 0 (0 = tuned to index.target_recall)")
    _check(ix.ef_search >= 0, f"'index.ef_search' = {ix.ef_search}: expected >= 0 (0 = tuned)")


def _validate_search(se: SearchConfig, ev: EvalConfig) -> None:
    _check(se.k > 0, f"'search.k' = {se.k}: expected a positive integer")
    _check(se.batch_size > 0, f"'search.batch_size' = {se.batch_size}: expected a positive integer")
    _check(ev.depth >= 100, f"'eval.depth' = {ev.depth}: expected >= 100 (recall@100 needs the top 100)")


def _validate_mine(mi: MineConfig) -> None:
    _check(bool(mi.pairs_path) or bool(mi.queries_path and mi.qrels_path),
           "'mine.pairs_path' is empty: give query/positive pairs, or both mine.queries_path and mine.qrels_path")
    _check(bool(mi.queries_path) == bool(mi.qrels_path),
           "'mine.queries_path' and 'mine.qrels_path' go together: set both (BEIR input) or neither (pairs input)")
    _check(mi.format in CORPUS_FORMATS, f"'mine.format' = {mi.format!r}: expected parquet, jsonl or empty (infer)")
    _check(mi.range_min >= 0, f"'mine.range_min' = {mi.range_min}: expected >= 0")
    _check(mi.range_max >= 0, f"'mine.range_max' = {mi.range_max}: expected >= 0 (0 = automatic)")
    _check(mi.num_negatives >= 1, f"'mine.num_negatives' = {mi.num_negatives}: expected >= 1")
    if mi.range_max:
        _check(mi.range_min < mi.range_max,
               f"'mine.range_min' = {mi.range_min} must be below 'mine.range_max' = {mi.range_max}")
        _check(mi.num_negatives <= mi.range_max - mi.range_min,
               f"'mine.num_negatives' = {mi.num_negatives} does not fit the {mi.range_max - mi.range_min} candidates "
               f"between mine.range_min = {mi.range_min} and mine.range_max = {mi.range_max}")
    _check(mi.sampling in SAMPLINGS, f"'mine.sampling' = {mi.sampling!r}: expected one of {', '.join(SAMPLINGS)}")
    _check(mi.mode in MINE_MODES, f"'mine.mode' = {mi.mode!r}: expected one of {', '.join(MINE_MODES)}")
    unknown = [f for f in mi.formats if f not in MINE_FORMATS]
    _check(not unknown, f"'mine.formats' = {mi.formats!r}: unknown {unknown}; expected any of {', '.join(MINE_FORMATS)}")
    _check(mi.queries_per_part >= 1, f"'mine.queries_per_part' = {mi.queries_per_part}: expected >= 1")
    _check(mi.input_mb_per_bucket > 0, f"'mine.input_mb_per_bucket' = {mi.input_mb_per_bucket}: expected > 0")
    _check(mi.cross_encoder_batch_size >= 1,
           f"'mine.cross_encoder_batch_size' = {mi.cross_encoder_batch_size}: expected >= 1")
    _check(mi.cross_encoder_max_length is None or mi.cross_encoder_max_length >= 1,
           f"'mine.cross_encoder_max_length' = {mi.cross_encoder_max_length}: expected >= 1 or null (the model's own)")
    _check(mi.cross_encoder_precision in PRECISIONS, f"'mine.cross_encoder_precision' = "
           f"{mi.cross_encoder_precision!r}: expected one of {', '.join(PRECISIONS)}")


def _validate_refresh(rf: RefreshConfig, pu: PublishConfig) -> None:
    _check(rf.retrain in RETRAIN_MODES,
           f"'refresh.retrain' = {rf.retrain!r}: expected one of {', '.join(RETRAIN_MODES)}")
    _check(rf.retrain_drift > 0, f"'refresh.retrain_drift' = {rf.retrain_drift}: expected > 0 (e.g. 0.1 = 10% growth)")
    _check(rf.diff_buckets >= 0, f"'refresh.diff_buckets' = {rf.diff_buckets}: expected >= 0 (0 = automatic)")
    _check(rf.inline_snapshot_rows >= 0, f"'refresh.inline_snapshot_rows' = {rf.inline_snapshot_rows}: expected >= 0 "
           f"(0 = always in Ray tasks)")
    for key in ("min_recall", "max_reject_fraction", "max_deleted_fraction", "max_added_fraction", "max_ndcg_drop"):
        value = getattr(pu, key)
        _check(0 <= value <= 1, f"'publish.{key}' = {value}: expected a number in [0, 1]")
    _check(pu.keep_versions >= 1, f"'publish.keep_versions' = {pu.keep_versions}: expected >= 1")
    _check(pu.lock_timeout > 0, f"'publish.lock_timeout' = {pu.lock_timeout}: expected seconds > 0")


def _validate_train(tr: TrainConfig, rt: RuntimeConfig) -> None:
    _check(tr.epochs >= 1, f"'train.epochs' = {tr.epochs}: expected >= 1")
    _check(tr.batch_size >= 2, f"'train.batch_size' = {tr.batch_size}: expected >= 2 (in-batch negatives)")
    _check(tr.learning_rate > 0, f"'train.learning_rate' = {tr.learning_rate}: expected > 0")
    _check(0 <= tr.warmup_ratio < 1, f"'train.warmup_ratio' = {tr.warmup_ratio}: expected a number in [0, 1)")
    _check(tr.max_steps >= 0, f"'train.max_steps' = {tr.max_steps}: expected >= 0 (0 = train.epochs decide)")
    _check(tr.num_negatives >= 0, f"'train.num_negatives' = {tr.num_negatives}: expected >= 0 (0 = in-batch only)")
    _check(tr.temperature > 0, f"'train.temperature' = {tr.temperature}: expected > 0")
    _check(tr.mini_batch_size >= 1, f"'train.mini_batch_size' = {tr.mini_batch_size}: expected >= 1")
    _check(0 <= tr.eval_fraction < 1, f"'train.eval_fraction' = {tr.eval_fraction}: expected a number in [0, 1)")
    _check(tr.eval_corpus_size >= 1, f"'train.eval_corpus_size' = {tr.eval_corpus_size}: expected >= 1")
    _check(tr.checkpoint_steps >= 0,
           f"'train.checkpoint_steps' = {tr.checkpoint_steps}: expected >= 0 (0 = no checkpoints)")
    _check(rt.num_workers <= 1 or tr.batch_size >= rt.num_workers,
           f"'train.batch_size' = {tr.batch_size} must be at least runtime.num_workers = {rt.num_workers}")
