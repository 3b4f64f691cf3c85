"""`auto` for model.backend and model.precision: the pick follows the CPU's features, the device and the runtimes
installed; a setting that is not auto is kept; the pick is made once and carried by the config."""

import dataclasses
import logging

import numpy as np
import pytest
from helpers import config, write_synthetic_embeddings

from retrieval_core.encode import encoding, hardware
from retrieval_core.encode.hardware import Hardware

AVX2 = ("avx2",)
BF16 = ("avx512_bf16", "avx512_vnni", "avx2")
AMX = ("amx_bf16", "avx2")
BOTH = ("onnx", "openvino")


@pytest.mark.parametrize(
    "hw, picked",
    [
        (Hardware(AVX2, runtimes=BOTH), ("openvino", "fp32")),
        (Hardware(AVX2, runtimes=("onnx",)), ("onnx", "fp32")),
        (Hardware(AVX2), ("torch", "fp32")),
        (Hardware(BF16, runtimes=BOTH), ("openvino", "bf16")),
        (Hardware(AMX, runtimes=("onnx",)), ("torch", "bf16")),
        (Hardware(BF16), ("torch", "bf16")),
        (Hardware(AVX2, cuda=True, runtimes=BOTH), ("torch", "fp16")),
        (Hardware((), runtimes=()), ("torch", "fp32")),
    ],
)
def test_auto_picks_the_fastest_lossless_path_installed_for_the_hardware(hw, picked):
    assert hardware.choose("auto", "auto", hw) == picked


def test_a_setting_that_is_not_auto_is_kept_and_the_other_picked_to_go_with_it():
    assert hardware.choose("torch", "auto", Hardware(BF16, runtimes=BOTH)) == ("torch", "bf16")
    assert hardware.choose("torch", "auto", Hardware(AVX2, runtimes=BOTH)) == ("torch", "fp32")
    assert hardware.choose("auto", "fp32", Hardware(BF16, runtimes=BOTH)) == ("openvino", "fp32")
    assert hardware.choose("onnx", "auto", Hardware(BF16, runtimes=BOTH)) == ("onnx", "fp32")
    assert hardware.choose("auto", "fp16", Hardware(AVX2, runtimes=BOTH)) == ("torch", "fp16")
    assert hardware.choose("openvino", "auto", Hardware(AVX2)) == ("openvino", "fp32")  # its extra: check_extras


def test_the_pick_is_said_once_and_the_config_carries_it(tmp_path, tiny_model, caplog):
    hardware._say.cache_clear()
    model = config("unused", tmp_path, model=tiny_model, model__backend="auto", model__precision="auto").model
    hw = Hardware(BF16, runtimes=("onnx",))
    with caplog.at_level(logging.INFO):
        first = hardware.resolved(model, hw)
        again = hardware.resolved(model, hw)
    assert (first.backend, first.precision) == ("torch", "bf16") and again == first
    assert caplog.text.count("encoding with torch in bf16") == 1 and "avx512_bf16" in caplog.text
    assert hardware.resolved(first, Hardware(AVX2)) is first  # nothing left to pick
    identity = encoding.encoder_identity(first)
    assert identity["precision"] == "bf16" and "backend" not in identity


def test_an_unresolved_config_fingerprints_as_this_machine_s_pick(tmp_path, tiny_model):
    model = config("unused", tmp_path, model=tiny_model, model__backend="auto", model__precision="auto").model
    picked = hardware.resolved(model, hardware.this_machine())
    assert encoding.encoder_identity(model) == encoding.encoder_identity(picked)
    assert dataclasses.replace(model, backend=picked.backend, precision=picked.precision) == picked


def test_this_machine_reads_the_cpu_flags():
    flags = hardware.cpu_flags()
    assert set(flags) <= set(hardware.CPU_FLAGS)
    with open("/proc/cpuinfo") as cpuinfo:
        text = cpuinfo.read()
    assert ("avx2" in flags) == (" avx2" in text)


def test_a_job_resolves_auto_once_before_it_runs(tmp_path, tiny_model, monkeypatch):
    from jobs import _cli
    from jobs.ray import cluster

    seen = []
    monkeypatch.setattr(hardware, "this_machine", lambda gpus=0: seen.append(gpus) or Hardware(AVX2))
    args = _cli.parser("test", "test").parse_args(
        ["--set", f"model.name={tiny_model}", "--set", "model.backend=auto", "--set", "model.precision=auto"]
        + ["--set", f"output.root={tmp_path / 'out'}"]
    )
    cfg = _cli.config_from_args(args)
    assert (cfg.model.backend, cfg.model.precision) == ("torch", "fp32") and seen == [0]
    assert cluster.resolve_auto(cfg) is cfg


def test_auto_keeps_what_the_output_s_embeddings_were_encoded_with(tmp_path, tiny_model, monkeypatch):
    """A resume, a reading stage on other hardware or a refresh night on another node kind keeps the fingerprint
    of the embeddings there; only a new output gets the hardware's pick."""
    import json

    from jobs.ray import cluster

    monkeypatch.setattr(hardware, "this_machine", lambda gpus=0: Hardware(BF16, runtimes=BOTH))
    cfg = config("unused", tmp_path / "out", model=tiny_model, model__backend="auto", model__precision="auto")
    fresh = cluster.resolve_auto(cfg)
    assert (fresh.model.backend, fresh.model.precision) == ("openvino", "bf16")
    write_synthetic_embeddings(tmp_path / "out", np.ones((4, 8), np.float32) / np.sqrt(8), 2)
    assert cluster._recorded_path(cfg) == ("torch", "fp32")  # an identity without backend or precision: the defaults
    kept = cluster.resolve_auto(cfg)
    assert (kept.model.backend, kept.model.precision) == ("torch", "fp32")
    half = cluster.resolve_auto(config("unused", tmp_path / "out", model=tiny_model, model__precision="auto"))
    assert (half.model.backend, half.model.precision) == ("torch", "fp32")
    assert json.dumps(encoding.encoder_identity(kept.model)) == json.dumps(
        encoding.encoder_identity(config("unused", tmp_path, model=tiny_model).model)
    )
