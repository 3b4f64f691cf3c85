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
