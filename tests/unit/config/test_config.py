import re
from pathlib import Path

import pytest
import yaml

from retrieval_core.config import Config, ConfigError, load_config, reference, valid_keys

REPO = Path(__file__).resolve().parents[3]


def test_defaults_equal_the_demo_config():
    assert load_config(str(REPO / "configs" / "demo.yaml")) == Config()


def test_every_key_is_in_the_demo_config_with_its_default():
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    defaults = Config().to_dict()
    for key in valid_keys():
        section, name = key.split(".")
        assert name in demo[section], f"{key} missing from configs/demo.yaml"
        assert demo[section][name] == defaults[section][name], f"{key}: demo.yaml differs from the default"


def test_the_configuration_reference_is_generated_from_the_field_docs():
    """docs/configuration.md is reference.markdown(): one source (the string under each field of the schema)."""
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == reference.markdown(), "docs/configuration.md is stale: run make docs"
    rows = reference.rows()
    assert [key for key, _, _ in rows] == valid_keys()
    for key, default, meaning in rows:
        assert f"| `{key}` | `{default}` | {meaning} |" in page
    shown = {key: default for key, default, _ in rows}  # defaults as YAML writes them
    assert shown["model.batch_size"] == "32" and shown["corpus.title_column"] == "null"
    assert shown["mine.formats"] == "[triplet, n-tuple, flag-jsonl]" and shown["corpus.format"] == '""'


def test_a_key_without_a_meaning_is_named(monkeypatch):
    docs = reference.field_docs()
    del docs["MineConfig"]["num_negatives"]
    monkeypatch.setattr(reference, "field_docs", lambda: docs)
    with pytest.raises(ValueError, match=r"'mine\.num_negatives' has no meaning"):
        reference.rows()


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(
        None,
        [
            "model.batch_size=64",
            "model.normalize=false",
            "corpus.path=[a.parquet, b.parquet]",
            "corpus.title_column=title",
            "runtime.gpus_per_worker=0.5",
        ],
    )
    assert cfg.model.batch_size == 64 and cfg.model.normalize is False
    assert cfg.corpus.path == ["a.parquet", "b.parquet"]
    assert cfg.corpus.title_column == "title"
    assert cfg.runtime.gpus_per_worker == 0.5


def test_unknown_key_suggests_the_closest():
    with pytest.raises(
        ConfigError, match=re.escape("unknown config key 'model.batchsize'; did you mean 'model.batch_size'?")
    ):
        load_config(None, ["model.batchsize=3"])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("corpus:\n  text_colum: body\n")
    with pytest.raises(ConfigError, match="corpus.text_colum.*corpus.text_column"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.precision=fp8", "'model.precision' = 'fp8': expected one of auto, fp32, bf16, fp16"),
        ("model.batch_size=0", "'model.batch_size' = 0: expected a positive integer"),
        ("model.batch_size=many", "'model.batch_size' = 'many': expected an integer"),
        ("model.normalize=maybe", "'model.normalize' = 'maybe': expected true or false"),
        ("runtime.rows_per_shard=-1", "'runtime.rows_per_shard' = -1"),
        ("output.embedding_dtype=int8", "'output.embedding_dtype' = 'int8'"),
        ("corpus.format=csv", "'corpus.format' = 'csv'"),
    ],
)
def test_bad_values_name_key_and_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_override_without_equals():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["model.batch_size"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_resolved_config_round_trips():
    cfg = load_config(None, ["model.precision=bf16", "runtime.num_workers=3"])
    again = load_config(None, [f"{k}={v}" for k, v in _flatten(cfg.to_dict()) if v is not None])
    assert again == cfg


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and k != "storage_options":
            yield from _flatten(v, f"{prefix}{k}.")
        elif not (isinstance(v, dict) and not v):
            yield f"{prefix}{k}", yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def test_exponent_numbers_without_a_dot_are_numbers():
    from retrieval_core.config import ConfigError, load_config

    assert load_config(None, ["train.learning_rate=2e-5"]).train.learning_rate == 2e-5
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(None, ["train.learning_rate=fast"])


def test_environment_variables_expand_in_config_files(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(
        "corpus:\n  path: ${DATA_DIR}/corpus.jsonl\noutput:\n  root: ${OUT_DIR:-out/x}\n"
        "eval:\n  qrels_path: ${DATA_DIR:?get the data first}/qrels.tsv\n"
    )
    monkeypatch.setenv("DATA_DIR", "/data/sf")
    monkeypatch.delenv("OUT_DIR", raising=False)
    cfg = load_config(str(path))
    assert (cfg.corpus.path, cfg.output.root, cfg.eval.qrels_path) == (
        "/data/sf/corpus.jsonl",
        "out/x",
        "/data/sf/qrels.tsv",
    )
    monkeypatch.delenv("DATA_DIR")
    with pytest.raises(ConfigError, match=r"uses \$\{DATA_DIR\}, which is not set"):
        load_config(str(path))
    path.write_text("eval:\n  qrels_path: ${DATA_DIR:?get the data first}/qrels.tsv\n")
    with pytest.raises(ConfigError, match="which is not set: get the data first"):
        load_config(str(path))


def test_default_value_of_a_key():
    from retrieval_core.config import default_value

    assert default_value("model.batch_size") == 32 and default_value("corpus.title_column") is None
    with pytest.raises(ConfigError, match="did you mean 'model.batch_size'"):
        default_value("model.batch_sise")
