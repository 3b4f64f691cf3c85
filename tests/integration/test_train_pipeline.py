"""Training and the pipeline, on the demo corpus with the tiny model (Ray Train with two workers and a killed one:
test_s3, with its run directory on S3)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO_CORPUS, REPO, config

from jobs import encode, index, mine, pipeline, train
from retrieval_core.config import load_config
from retrieval_core.io.folder import Folder

pytestmark = pytest.mark.usefixtures("ray_cluster")
PAIRS = REPO / "examples" / "demo" / "pairs.jsonl"
SETTINGS = {
    "corpus__title_column": "title",
    "runtime__rows_per_shard": 32,
    "index__type": "Flat",
    "mine__pairs_path": str(PAIRS),
    "mine__query_id_column": "query_id",
    "train__batch_size": 8,
    "train__max_steps": 3,
    "train__learning_rate": 1e-3,
    "train__eval_fraction": 0.2,
    "mine__relative_margin": "null",
}  # the tiny random model scores all documents alike: no margin


def state(path) -> dict:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def mined(tmp_path_factory, tiny_model_without_dropout):
    cfg = config(DEMO_CORPUS, tmp_path_factory.mktemp("train") / "out", model=tiny_model_without_dropout, **SETTINGS)
    encode.run(cfg)
    index.run(cfg)
    mine.run(cfg)
    return cfg


def with_train_output(cfg, path, **runtime):
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, output=str(path)), runtime=dataclasses.replace(cfg.runtime, **runtime)
    )


def test_finished_training_is_reused_and_other_settings_refused(mined, tmp_path):
    cfg = with_train_output(mined, tmp_path / "m")
    first = train.run(cfg)
    again = train.run(cfg)
    assert again["reused"] and again["history"] == first["history"]
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=5e-4))
    with pytest.raises(Exception, match="other settings"):
        train.run(other)


def pipeline_items(root, model, *extra) -> list[str]:
    items = [f"output.root={root}", f"model.name={model}", "runtime.progress=false"]
    return items + [f"{k.replace('__', '.')}={v}" for k, v in SETTINGS.items()] + list(extra)


def pipeline_command(root, model, *extra):
    command = [sys.executable, "-m", "jobs.pipeline"]
    for item in pipeline_items(root, model, *extra):
        command += ["--set", item]
    return command


def outputs(root: Path) -> dict:
    """What a pipeline run leaves that must not depend on interruptions: metrics, negatives, trained weights."""
    from retrieval_core.mine import mining

    return {
        "eval": json.loads((root / "eval" / "metrics.json").read_text())["metrics"],
        "reeval": json.loads((root / "trained" / "eval" / "metrics.json").read_text())["metrics"],
        "negatives": mining.read_parts(Folder(str(root))).column("negative_ids").to_pylist(),
        "weights": state(root / "model"),
    }


def test_pipeline_killed_during_training_resumes_to_the_clean_result(tmp_path, tiny_model_without_dropout):
    env = {**os.environ, "RAY_ADDRESS": ""}
    pipeline.run(load_config(None, pipeline_items(tmp_path / "clean", tiny_model_without_dropout)))  # in this process
    root = tmp_path / "killed"
    proc = subprocess.Popen(
        pipeline_command(root, tiny_model_without_dropout),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (root / "negatives" / "_manifest.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "trained" / "eval" / "metrics.json").exists()
    rerun = subprocess.run(
        pipeline_command(root, tiny_model_without_dropout),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "Token authentication is enabled" not in rerun.stderr  # the job's own local cluster: no alarm
    table = {line.split()[0]: line for line in rerun.stdout.splitlines() if line.strip()}
    assert "total" in table
    assert all(table[stage].endswith(" reused") for stage in ("encode", "index", "evaluate", "mine"))
    assert not table["train"].endswith(" reused") and not table["reevaluate"].endswith(" reused")
    a, b = outputs(tmp_path / "clean"), outputs(root)
    assert a["eval"] == b["eval"] and a["negatives"] == b["negatives"]
    assert a["reeval"] == pytest.approx(b["reeval"], abs=1e-6)
    for name in a["weights"]:
        np.testing.assert_allclose(a["weights"][name], b["weights"][name], atol=1e-6, err_msg=name)


def test_pipeline_stages_select_what_runs(tmp_path, tiny_model_without_dropout):
    cfg = load_config(
        None,
        [
            f"output.root={tmp_path}",
            f"model.name={tiny_model_without_dropout}",
            "runtime.progress=false",
            "pipeline.stages=[encode, index]",
            "index.type=Flat",
        ],
    )
    results = pipeline.run(cfg)
    assert list(results) == ["encode", "index"]
    assert (tmp_path / "index" / "manifest.json").exists() and not (tmp_path / "negatives").exists()


def test_a_pipeline_that_trains_without_the_n_tuple_export_is_refused_before_any_stage(tmp_path, tiny_model):
    from retrieval_core.config import ConfigError

    cfg = load_config(None, pipeline_items(tmp_path / "out", tiny_model, "mine.formats=[triplet]"))
    with pytest.raises(ConfigError, match=r"mine.formats = \['triplet'\] leaves it out: add 'n-tuple'"):
        pipeline.run(cfg)
    assert not (tmp_path / "out").exists()
