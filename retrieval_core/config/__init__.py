"""Configuration: what every stage reads before it touches data.

``schema`` holds one frozen dataclass per config section and the allowed values; ``rules`` checks what types
cannot; ``loading`` reads YAML (any fsspec URL), expands ``${VAR}``, applies ``--set`` overrides and validates.
Reads: a YAML file. Writes: nothing. The names most callers need are re-exported here.
"""

from retrieval_core.config.loading import apply_override, load_config, parse_override, read_yaml
from retrieval_core.config.rules import check_cluster_paths, parse_memory, validate
from retrieval_core.config.schema import (
    DEFAULT_MODEL,
    PIPELINE_STAGES,
    REDACTED,
    Config,
    ConfigError,
    CorpusConfig,
    EvalConfig,
    IndexConfig,
    MineConfig,
    ModelConfig,
    OutputConfig,
    PipelineConfig,
    PublishConfig,
    RefreshConfig,
    RuntimeConfig,
    SearchConfig,
    ServeConfig,
    TrainConfig,
    default_value,
    redact_storage_options,
    valid_keys,
)

__all__ = [
    "DEFAULT_MODEL",
    "PIPELINE_STAGES",
    "REDACTED",
    "Config",
    "ConfigError",
    "CorpusConfig",
    "EvalConfig",
    "IndexConfig",
    "MineConfig",
    "ModelConfig",
    "OutputConfig",
    "PipelineConfig",
    "PublishConfig",
    "RefreshConfig",
    "RuntimeConfig",
    "SearchConfig",
    "ServeConfig",
    "TrainConfig",
    "apply_override",
    "check_cluster_paths",
    "default_value",
    "load_config",
    "parse_memory",
    "parse_override",
    "read_yaml",
    "redact_storage_options",
    "valid_keys",
    "validate",
]
