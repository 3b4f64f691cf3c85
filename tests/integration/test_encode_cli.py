"""Errors the encode command reports before any work starts (no Ray needed)."""

import subprocess

from helpers import REPO, encode_command, make_docs, write_parquet


def run_cli(*overrides):
    return subprocess.run(encode_command(*overrides), cwd=REPO, capture_output=True, text=True, timeout=120)


def test_duplicate_ids_are_an_error_naming_examples(tmp_path):
    docs = make_docs(6)
    docs[4]["id"] = docs[2]["id"]
    path = write_parquet(tmp_path / "c.parquet", docs)
    result = run_cli(f"corpus.path={path}", f"output.root={tmp_path / 'out'}")
    assert result.returncode == 1
    assert "duplicate values in id column 'id', e.g. ['doc00002']" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_column_lists_the_columns_present(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", make_docs(3))
    result = run_cli(f"corpus.path={path}", "corpus.text_column=body", f"output.root={tmp_path / 'out'}")
    assert result.returncode == 1 and "columns present: id, title, text" in result.stderr


def test_unknown_key_is_a_config_error():
    result = run_cli("runtime.num_worker=2")
    assert result.returncode != 0
    assert "did you mean 'runtime.num_workers'?" in result.stderr


def test_a_relative_output_root_is_refused_on_a_cluster(tmp_path):
    """Under `ray job submit` (RAY_ADDRESS set) a relative output.root would land in each node's temporary copy of
    the working directory: refused before any connection, naming where it would have gone."""
    import os

    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9"}
    result = subprocess.run(
        encode_command("output.root=out/relative"), cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode != 0
    assert "output.root = 'out/relative' is a relative path" in result.stderr
    assert str(REPO / "out" / "relative") in result.stderr and "s3://" in result.stderr
    missing = subprocess.run(
        encode_command(f"output.root={tmp_path / 'out'}", "corpus.path=data/none.parquet"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert (
        missing.returncode != 0
        and "corpus.path 'data/none.parquet' is a relative path that does not exist" in missing.stderr
    )
    assert not (REPO / "out" / "relative").exists() and not (tmp_path / "out").exists()


def test_help_names_the_command_what_it_writes_and_the_main_keys():
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "jobs.encode", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m jobs.encode")
    assert "<output.root>/embeddings/" in result.stdout and "``" not in result.stdout
    assert "runtime.rows_per_shard  0" in result.stdout
    assert 'model.name              "all-MiniLM-L6-v2"' in result.stdout
