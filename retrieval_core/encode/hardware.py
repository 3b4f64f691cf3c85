"""What ``auto`` picks for ``model.backend`` and ``model.precision``: the fastest lossless path the hardware that
encodes has, among the runtimes installed.

Lossless means vectors within a cosine of 0.9999 of torch fp32's (each backend checks its own at load, see
``exported``). The order of preference was measured with ``bench/encode_vs_st.py`` (docs/s over plain
sentence-transformers fp32, all-MiniLM-L6-v2, SciFact):

* a CUDA device: torch in fp16;
* a CPU that computes bf16 natively (``avx512_bf16`` or ``amx_bf16`` in its flags): OpenVINO bf16, else torch bf16;
* any other CPU: OpenVINO fp32, else ONNX Runtime fp32, else torch fp32.

A setting that is not ``auto`` is kept, and the other one picked to go with it. The pick is made once per run, for
the hardware of the workers (``jobs`` asks a worker on a cluster; a local run reads this machine), and the run's
config carries it from then on: fingerprints, manifests and resumes see the concrete backend and precision.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

CPU_FLAGS = ("amx_bf16", "avx512_bf16", "avx512_vnni", "avx2")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
RUNTIME_MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}

CUDA_ORDER = (("torch", "fp16"), ("torch", "fp32"))
BF16_CPU_ORDER = (("openvino", "bf16"), ("torch", "bf16"), ("openvino", "fp32"), ("onnx", "fp32"), ("torch", "fp32"))
CPU_ORDER = (("openvino", "fp32"), ("onnx", "fp32"), ("torch", "fp32"))


@dataclass(frozen=True)
class Hardware:
    """What a worker encodes on: the CPU flags of ``CPU_FLAGS`` it has, whether it has a CUDA device, and the
    runtimes (``onnx``, ``openvino``) installed."""

    cpu_flags: tuple[str, ...] = ()
    cuda: bool = False
    runtimes: tuple[str, ...] = ()

    @property
    def native_bf16(self) -> bool:
        return any(flag in self.cpu_flags for flag in BF16_FLAGS)

    def describe(self) -> str:
        device = (
            "a CUDA device"
            if self.cuda
            else "a CPU with " + (", ".join(self.cpu_flags) or "none of " + "/".join(CPU_FLAGS))
        )
        return f"{device}; runtimes installed: {', '.join(('torch', *self.runtimes))}"


def cpu_flags() -> tuple[str, ...]:
    """The flags of ``CPU_FLAGS`` this machine's CPU has (from /proc/cpuinfo; none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(" ".join(line for line in cpuinfo if line.startswith("flags")).split())
    except OSError:
        return ()
    return tuple(flag for flag in CPU_FLAGS if flag in flags)


def this_machine(gpus: float = 0) -> Hardware:
    """This machine's hardware as a worker with ``gpus`` GPUs sees it (CUDA is looked for only when ``gpus``)."""
    from retrieval_core.config.rules import installed

    cuda = False
    if gpus and gpus > 0:
        import torch

        cuda = torch.cuda.is_available()
    exporter = installed("onnx")  # torch's ONNX exporter, which both runtimes' models come from
    runtimes = tuple(backend for backend, module in RUNTIME_MODULES.items() if exporter and installed(module))
    return Hardware(cpu_flags(), cuda, runtimes)


def choose(backend: str, precision: str, hw: Hardware) -> tuple[str, str]:
    """The (backend, precision) ``auto`` stands for on ``hw``: the first of the hardware's order of preference that
    agrees with the settings that are not ``auto`` and whose runtime is installed."""
    order = CUDA_ORDER if hw.cuda else BF16_CPU_ORDER if hw.native_bf16 else CPU_ORDER
    for candidate_backend, candidate_precision in order:
        if (
            backend in ("auto", candidate_backend)
            and precision in ("auto", candidate_precision)
            and (candidate_backend == "torch" or candidate_backend in hw.runtimes)
        ):
            return candidate_backend, candidate_precision
    return (
        "torch" if backend == "auto" else backend,
        "fp32" if precision == "auto" else precision,
    )


def resolved(model, hw: Hardware | None = None, gpus: float = 0):
    """``model`` (a ModelConfig) with ``auto`` replaced by what ``choose`` picks on ``hw`` (default: this
    machine); said once per process and pick. A config without ``auto`` comes back as it is."""
    if model.provider != "local" or "auto" not in (model.backend, model.precision):
        return model
    hw = hw or this_machine(gpus)
    backend, precision = choose(model.backend, model.precision, hw)
    _say(model.backend, model.precision, backend, precision, hw)
    return dataclasses.replace(model, backend=backend, precision=precision)


@functools.lru_cache(maxsize=None)
def _say(backend: str, precision: str, picked_backend: str, picked_precision: str, hw: Hardware) -> None:
    log.info(
        "model.backend = %r, model.precision = %r: encoding with %s in %s, the fastest lossless path on %s",
        backend,
        precision,
        picked_backend,
        picked_precision,
        hw.describe(),
    )
