"""The rules of a job configuration: the allowed values of its enumerated settings, and the checks of values that
types alone cannot catch (:func:`validate`); each error names the key, the value and what is allowed.

It reads the configuration's dataclasses (``retrieval_core.config.schema``); loading (``retrieval_core.config.loading``)
calls it after the types are checked.
"""

from __future__ import annotations

import importlib.util
import os
import re

from retrieval_core.config.schema import (
    CORPUS_FORMATS,
    EMBEDDING_DTYPES,
    METRICS,
    MINE_FORMATS,
    MINE_MODES,
    MODEL_BACKENDS,
    MODEL_FAMILIES,
    MODEL_PRECISIONS,
    MODEL_PROVIDERS,
    PIPELINE_STAGES,
    PRECISIONS,
    RETRAIN_MODES,
    SAMPLINGS,
    VECTOR_CODES,
    Config,
    ConfigError,
    EvalConfig,
    IndexConfig,
    MineConfig,
    ModelConfig,
    PublishConfig,
    RefreshConfig,
    RuntimeConfig,
    SearchConfig,
    ServeConfig,
    TrainConfig,
)
from retrieval_core.config.sinks import sink_specs


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
    _check(
        all(isinstance(p, str) and p for p in paths),
        f"'corpus.path' = {c.path!r}: expected a path or URL, or a list of them (non-empty strings)",
    )
    _check(
        bool(m.name.strip()),
        "'model.name' is empty: give the packaged default (all-MiniLM-L6-v2), a model "
        "directory or URL, a Hub name, or an API model name with model.provider",
    )
    _check(
        m.precision in MODEL_PRECISIONS,
        f"'model.precision' = {m.precision!r}: expected one of {', '.join(MODEL_PRECISIONS)}",
    )
    _check(m.batch_size > 0, f"'model.batch_size' = {m.batch_size}: expected a positive integer")
    _check(
        m.max_seq_length is None or m.max_seq_length > 0,
        f"'model.max_seq_length' = {m.max_seq_length}: expected a positive integer or null (the model's own)",
    )
    _check(m.family in MODEL_FAMILIES, f"'model.family' = {m.family!r}: expected one of {', '.join(MODEL_FAMILIES)}")
    _check(
        m.truncate_dim is None or m.truncate_dim > 0,
        f"'model.truncate_dim' = {m.truncate_dim}: expected a positive integer or null (no truncation)",
    )
    _validate_provider(m)
    _check(bool(o.root), "'output.root' is empty: give a directory or fsspec URL")
    _check(
        o.embedding_dtype in EMBEDDING_DTYPES,
        f"'output.embedding_dtype' = {o.embedding_dtype!r}: expected one of {', '.join(EMBEDDING_DTYPES)}",
    )
    _check(r.num_cpus >= 0, f"'runtime.num_cpus' = {r.num_cpus}: expected >= 0 (0 = all cores)")
    _check(r.num_workers >= 0, f"'runtime.num_workers' = {r.num_workers}: expected >= 0 (0 = one per free slot)")
    _check(r.cpus_per_worker >= 1, f"'runtime.cpus_per_worker' = {r.cpus_per_worker}: expected >= 1")
    _check(r.gpus_per_worker >= 0, f"'runtime.gpus_per_worker' = {r.gpus_per_worker}: expected >= 0")
    _check(r.rows_per_shard >= 0, f"'runtime.rows_per_shard' = {r.rows_per_shard}: expected >= 0 (0 = automatic)")
    _check(r.max_restarts >= 0, f"'runtime.max_restarts' = {r.max_restarts}: expected >= 0")
    _check(r.max_task_retries >= 0, f"'runtime.max_task_retries' = {r.max_task_retries}: expected >= 0")
    _check(
        r.speculation == 0 or r.speculation >= 1,
        f"'runtime.speculation' = {r.speculation}: expected 0 (off) or a multiple >= 1 of the median shard time",
    )
    _check(r.inline_rows >= 0, f"'runtime.inline_rows' = {r.inline_rows}: expected >= 0 (0 = always on actors)")
    _check(
        r.progress in (True, False, "auto"),
        f"'runtime.progress' = {r.progress!r}: expected auto (bars when stderr is a terminal, else one line per "
        f"step), true or false",
    )
    _validate_index(config.index)
    _validate_search(config.search, config.eval)
    _validate_mine(config.mine)
    _validate_train(config.train, config.runtime)
    _validate_refresh(config.refresh, config.publish)
    _validate_serve(config.serve)
    unknown = [st for st in config.pipeline.stages if st not in PIPELINE_STAGES]
    _check(
        not unknown,
        f"'pipeline.stages' = {config.pipeline.stages!r}: unknown {unknown}; expected any of "
        f"{', '.join(PIPELINE_STAGES)}",
    )


GPU_SETTINGS = ("auto", "true", "false")


def gpu_setting(ix: IndexConfig) -> str:
    """``index.gpu`` as one of ``GPU_SETTINGS`` (YAML reads true and false as booleans)."""
    return str(ix.gpu).lower()


def parse_memory(text: str, key: str = "index.max_memory") -> int:
    """``'8GB'``, ``'512MB'``, ``'1.5GiB'`` or a plain number of bytes -> bytes (decimal and binary units alike);
    an error names ``key``."""
    units = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    cleaned = str(text).strip().upper().replace("IB", "").rstrip("B")
    number = cleaned.rstrip("KMGT")
    unit = cleaned[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"'{key}' = {text!r}: expected a size such as 8GB, 512MB or a number of bytes") from None
    if value <= 0:
        raise ConfigError(f"'{key}' = {text!r}: expected a positive size")
    return int(value)


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
AUTO_KEYS = ("precision", "backend")  # `auto` is accepted for an API too: there is nothing to pick
LOCAL_ONLY = {
    "precision": "fp32",
    "backend": "torch",
    "max_seq_length": None,
    "query_name": "",
    "trust_remote_code": False,
}


def _validate_provider(m: ModelConfig) -> None:
    _check(
        m.provider in MODEL_PROVIDERS,
        f"'model.provider' = {m.provider!r}: expected one of {', '.join(MODEL_PROVIDERS)}",
    )
    _check(
        m.backend in MODEL_BACKENDS,
        f"'model.backend' = {m.backend!r}: expected one of {', '.join(MODEL_BACKENDS)}",
    )
    _check(
        m.backend != "onnx" or m.precision in ("fp32", "auto"),
        f"'model.backend' = 'onnx' runs in fp32, and model.precision = {m.precision!r}: set model.precision = fp32, "
        f"or model.backend = torch or openvino for {m.precision}",
    )
    _check(
        m.backend != "openvino" or m.precision != "fp16",
        "'model.backend' = 'openvino' runs in fp32 or bf16, and model.precision = 'fp16': set model.precision = "
        "bf16 or fp32, or model.backend = torch for fp16",
    )
    _check(m.max_concurrency >= 1, f"'model.max_concurrency' = {m.max_concurrency}: expected >= 1")
    _check(m.max_retries >= 0, f"'model.max_retries' = {m.max_retries}: expected >= 0")
    _check(m.timeout > 0, f"'model.timeout' = {m.timeout}: expected seconds > 0")
    _check(
        m.max_input_chars >= 0,
        f"'model.max_input_chars' = {m.max_input_chars}: expected >= 0 (0 = the provider's limit)",
    )
    # the value is never shown: a key pasted here by mistake must not reach a log
    _check(
        not m.api_key_env or bool(ENV_NAME.fullmatch(m.api_key_env)),
        "'model.api_key_env' must name an environment variable (such as OPENAI_API_KEY) that holds the key, "
        "not hold the key itself; the value given is not a variable name and is not shown here",
    )
    _check(
        not m.base_url or m.base_url.startswith(("http://", "https://")),
        f"'model.base_url' = {m.base_url!r}: expected an http:// or https:// URL, or empty (the provider's)",
    )
    if m.provider == "local":
        return
    for key, default in LOCAL_ONLY.items():
        _check(
            getattr(m, key) == default or (key in AUTO_KEYS and getattr(m, key) == "auto"),
            f"'model.{key}' = {getattr(m, key)!r} applies to local models only; "
            f"model.provider = {m.provider!r} is an embedding API: leave it at {default!r}",
        )
    _check(
        m.family != "dpr",
        f"'model.family' = 'dpr' needs two local encoders; model.provider = {m.provider!r} is an embedding API",
    )


def _validate_index(ix: IndexConfig) -> None:
    _check(
        bool(ix.type.strip()),
        "'index.type' is empty: give a FAISS factory string such as Flat or IVF1024,Flat, or auto",
    )
    _check(ix.metric in METRICS, f"'index.metric' = {ix.metric!r}: expected one of {', '.join(METRICS)}")
    for kind, count in re.findall(r"(IVF|HNSW)(\d+)", ix.type):  # FAISS builds these, then fails (or aborts)
        least = 1 if kind == "IVF" else 2
        _check(int(count) >= least, f"'index.type' = {ix.type!r}: {kind}{count} needs {kind}<n> with n >= {least}")
    parse_memory(ix.max_memory)
    parse_memory(ix.merge_memory, "index.merge_memory")
    _check(gpu_setting(ix) in GPU_SETTINGS, f"'index.gpu' = {ix.gpu!r}: expected one of {', '.join(GPU_SETTINGS)}")
    _check(ix.train_size >= 0, f"'index.train_size' = {ix.train_size}: expected >= 0 (0 = automatic)")
    _check(0 < ix.target_recall <= 1, f"'index.target_recall' = {ix.target_recall}: expected a number in (0, 1]")
    _check(ix.recall_queries >= 0, f"'index.recall_queries' = {ix.recall_queries}: expected >= 0 (0 = skip)")
    _check(ix.nprobe >= 0, f"'index.nprobe' = {ix.nprobe}: expected >= 0 (0 = tuned to index.target_recall)")
    _check(ix.ef_search >= 0, f"'index.ef_search' = {ix.ef_search}: expected >= 0 (0 = tuned)")
    _check(
        ix.vectors in VECTOR_CODES,
        f"'index.vectors' = {ix.vectors!r}: expected one of {', '.join(VECTOR_CODES)}",
    )
    _check(ix.rescore_factor >= 0, f"'index.rescore_factor' = {ix.rescore_factor}: expected >= 0 (0 = no rescoring)")
    code = VECTOR_CODES[ix.vectors]
    _check(
        ix.type == "auto" or ix.vectors == "float32" or ix.type.split(",")[-1].strip().upper() == code.upper(),
        f"'index.type' = {ix.type!r} and index.vectors = {ix.vectors!r}: an explicit type must end in the code of "
        f"the vectors ({code}, e.g. IVF4096,{code}), or set index.type = auto",
    )


def _validate_search(se: SearchConfig, ev: EvalConfig) -> None:
    _check(se.k > 0, f"'search.k' = {se.k}: expected a positive integer")
    _check(se.batch_size > 0, f"'search.batch_size' = {se.batch_size}: expected a positive integer")
    _check(ev.depth >= 100, f"'eval.depth' = {ev.depth}: expected >= 100 (recall@100 needs the top 100)")


def _validate_mine(mi: MineConfig) -> None:
    _check(
        bool(mi.pairs_path) or bool(mi.queries_path and mi.qrels_path),
        "'mine.pairs_path' is empty: give query/positive pairs, or both mine.queries_path and mine.qrels_path",
    )
    _check(
        bool(mi.queries_path) == bool(mi.qrels_path),
        "'mine.queries_path' and 'mine.qrels_path' go together: set both (BEIR input) or neither (pairs input)",
    )
    _check(mi.format in CORPUS_FORMATS, f"'mine.format' = {mi.format!r}: expected parquet, jsonl or empty (infer)")
    _check(mi.range_min >= 0, f"'mine.range_min' = {mi.range_min}: expected >= 0")
    _check(mi.range_max >= 0, f"'mine.range_max' = {mi.range_max}: expected >= 0 (0 = automatic)")
    _check(mi.num_negatives >= 1, f"'mine.num_negatives' = {mi.num_negatives}: expected >= 1")
    if mi.range_max:
        _check(
            mi.range_min < mi.range_max,
            f"'mine.range_min' = {mi.range_min} must be below 'mine.range_max' = {mi.range_max}",
        )
        _check(
            mi.num_negatives <= mi.range_max - mi.range_min,
            f"'mine.num_negatives' = {mi.num_negatives} does not fit the {mi.range_max - mi.range_min} candidates "
            f"between mine.range_min = {mi.range_min} and mine.range_max = {mi.range_max}",
        )
    _check(mi.sampling in SAMPLINGS, f"'mine.sampling' = {mi.sampling!r}: expected one of {', '.join(SAMPLINGS)}")
    _check(mi.mode in MINE_MODES, f"'mine.mode' = {mi.mode!r}: expected one of {', '.join(MINE_MODES)}")
    unknown = [f for f in mi.formats if f not in MINE_FORMATS]
    _check(
        not unknown, f"'mine.formats' = {mi.formats!r}: unknown {unknown}; expected any of {', '.join(MINE_FORMATS)}"
    )
    _check(mi.queries_per_part >= 1, f"'mine.queries_per_part' = {mi.queries_per_part}: expected >= 1")
    _check(mi.input_mb_per_bucket > 0, f"'mine.input_mb_per_bucket' = {mi.input_mb_per_bucket}: expected > 0")
    _check(
        mi.cross_encoder_batch_size >= 1,
        f"'mine.cross_encoder_batch_size' = {mi.cross_encoder_batch_size}: expected >= 1",
    )
    _check(
        mi.cross_encoder_max_length is None or mi.cross_encoder_max_length >= 1,
        f"'mine.cross_encoder_max_length' = {mi.cross_encoder_max_length}: expected >= 1 or null (the model's own)",
    )
    _check(
        mi.cross_encoder_precision in PRECISIONS,
        f"'mine.cross_encoder_precision' = {mi.cross_encoder_precision!r}: expected one of {', '.join(PRECISIONS)}",
    )


def _validate_refresh(rf: RefreshConfig, pu: PublishConfig) -> None:
    _check(
        rf.retrain in RETRAIN_MODES, f"'refresh.retrain' = {rf.retrain!r}: expected one of {', '.join(RETRAIN_MODES)}"
    )
    _check(rf.retrain_drift > 0, f"'refresh.retrain_drift' = {rf.retrain_drift}: expected > 0 (e.g. 0.1 = 10% growth)")
    _check(
        0 < rf.compact_dead_fraction < 1,
        f"'refresh.compact_dead_fraction' = {rf.compact_dead_fraction}: expected a number in (0, 1)",
    )
    _check(
        0 <= rf.compact_budget <= 1,
        f"'refresh.compact_budget' = {rf.compact_budget}: expected a share in [0, 1] (0 = never compact)",
    )
    _check(rf.diff_buckets >= 0, f"'refresh.diff_buckets' = {rf.diff_buckets}: expected >= 0 (0 = automatic)")
    _check(
        rf.inline_snapshot_rows >= 0,
        f"'refresh.inline_snapshot_rows' = {rf.inline_snapshot_rows}: expected >= 0 (0 = always in Ray tasks)",
    )
    for key in ("min_recall", "max_reject_fraction", "max_deleted_fraction", "max_added_fraction", "max_ndcg_drop"):
        value = getattr(pu, key)
        _check(0 <= value <= 1, f"'publish.{key}' = {value}: expected a number in [0, 1]")
    _check(pu.keep_versions >= 1, f"'publish.keep_versions' = {pu.keep_versions}: expected >= 1")
    _check(pu.keep_failed >= 0, f"'publish.keep_failed' = {pu.keep_failed}: expected >= 0")
    _check(pu.lease_expiry > 0, f"'publish.lease_expiry' = {pu.lease_expiry}: expected seconds > 0")
    _check(
        0 < pu.lease_renew * 2 <= pu.lease_expiry,
        f"'publish.lease_renew' = {pu.lease_renew}: expected seconds > 0 and at most half of publish.lease_expiry "
        f"({pu.lease_expiry}), so that one late renewal does not lose the lease",
    )


def _validate_serve(sv: ServeConfig) -> None:
    _check(sv.batch_size >= 1, f"'serve.batch_size' = {sv.batch_size}: expected >= 1")
    _check(sv.max_retries >= 0, f"'serve.max_retries' = {sv.max_retries}: expected >= 0")
    sink_specs(sv.sinks, sv.batch_size)


def _validate_train(tr: TrainConfig, rt: RuntimeConfig) -> None:
    dims = tr.matryoshka_dims
    _check(
        isinstance(dims, list) and all(isinstance(d, int) and d > 0 for d in dims) and dims == sorted(set(dims))[::-1],
        f"'train.matryoshka_dims' = {dims!r}: expected distinct positive integers, largest first (or [] for none)",
    )
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
    _check(tr.eval_queries >= 1, f"'train.eval_queries' = {tr.eval_queries}: expected >= 1")
    _check(tr.shuffle_buffer >= 1, f"'train.shuffle_buffer' = {tr.shuffle_buffer}: expected >= 1")
    _check(
        tr.checkpoint_steps >= 0,
        f"'train.checkpoint_steps' = {tr.checkpoint_steps}: expected >= 0 (0 = no checkpoints)",
    )
    _check(
        rt.num_workers <= 1 or tr.batch_size >= rt.num_workers,
        f"'train.batch_size' = {tr.batch_size} must be at least runtime.num_workers = {rt.num_workers}",
    )


# Settings whose packages come with an extra of this project: (what the setting is, the module, the extra)
PROVIDER_EXTRAS = {"openai": ("openai", "openai"), "cohere": ("cohere", "cohere")}
BACKEND_EXTRAS = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}
SINK_EXTRAS = {"lance": ("lancedb", "lance"), "qdrant": ("qdrant_client", "qdrant")}


def check_extras(cfg: Config) -> None:
    """Refuse at start-up, in one line naming the extra to install, a setting whose package is not installed (an
    embedding API's SDK, s3fs for s3:// paths), instead of a ModuleNotFoundError deep in a stage."""
    needed = []
    if cfg.model.provider in PROVIDER_EXTRAS:
        needed.append((f"model.provider = {cfg.model.provider!r}", *PROVIDER_EXTRAS[cfg.model.provider]))
    if cfg.model.backend in BACKEND_EXTRAS:
        runtime, extra = BACKEND_EXTRAS[cfg.model.backend]
        for module in (runtime, "onnx"):  # onnx: torch's exporter writes the model with it
            needed.append((f"model.backend = {cfg.model.backend!r}", module, extra))
    for spec in sink_specs(cfg.serve.sinks, cfg.serve.batch_size):
        needed.append((f"the {spec['kind']} sink {spec['name']!r}", *SINK_EXTRAS[spec["kind"]]))
    for key, url in (
        ("corpus.path", cfg.corpus.path),
        ("output.root", cfg.output.root),
        ("model.name", cfg.model.name),
    ):
        if str(url).startswith(("s3://", "s3a://")):
            needed.append((f"{key} = {url!r}", "s3fs", "s3"))
    for what, module, extra in needed:
        if not installed(module):
            raise ConfigError(
                f"{what} needs the package {module!r}, which is not installed: pip install "
                f"'ray-retrieval-jobs[{extra}]' (or pip install {module})"
            )


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_cluster_paths(cfg: Config, address: str) -> None:
    """On a cluster (``address``: ``runtime.address`` or RAY_ADDRESS, '' when local), a relative local
    ``output.root`` would land in each node's own working directory (under ``ray job submit --working-dir``, a
    temporary copy that is deleted when the cluster stops), so it is refused, as is a relative corpus path that does
    not exist where the driver runs."""
    if not address:
        return
    shared = (
        "an absolute path on storage every node shares (e.g. /mnt/shared/run1) or an object store URL "
        "(e.g. s3://bucket/run1)"
    )
    if _is_relative(cfg.output.root):
        raise ConfigError(
            f"output.root = {cfg.output.root!r} is a relative path and this job runs on the Ray cluster "
            f"at {address}: it would resolve to {os.path.abspath(cfg.output.root)!r} on each node "
            f"that writes, which other nodes cannot read and which is lost when a submitted job's "
            f"working directory is removed; use {shared}"
        )
    paths = [cfg.corpus.path] if isinstance(cfg.corpus.path, str) else list(cfg.corpus.path)
    for path in paths:
        if _is_relative(path) and not os.path.exists(path) and not any(c in path for c in "*?["):
            raise ConfigError(
                f"corpus.path {path!r} is a relative path that does not exist here "
                f"({os.path.abspath(path)!r}), and this job runs on the Ray cluster at {address}; "
                f"use {shared}"
            )


def _is_relative(path: str) -> bool:
    return "://" not in path and not os.path.isabs(os.path.expanduser(path))
