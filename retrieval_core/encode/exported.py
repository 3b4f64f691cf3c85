"""``model.backend: onnx | openvino``: the transformer networks of a local sentence-transformers model run in ONNX
Runtime or OpenVINO.

Only the networks change. Each ``Transformer`` module of the model (one, or one per side of a Router) gets, in place
of its Hugging Face network, a small module that runs the same network exported to ONNX; tokenization, prompts,
pooling, truncation and normalization stay sentence-transformers' own. So the vectors are the model's, to float
rounding (OpenVINO in bf16: to bf16 rounding): before use, a few sentences are encoded both ways, and a cosine under
``MIN_COSINE`` (or an export or compilation that fails) puts the torch networks back, with a warning saying why.

The export (``torch.onnx.export``, the TorchScript exporter, dynamic batch and sequence axes) is made once per node
and model: it is cached under the file cache (``$RETRIEVAL_FILE_CACHE``) by the model's fingerprint, under a file
lock. Both runtimes read that one file; OpenVINO also keeps its compiled model in the cache (``openvino/``), so
later loads skip the compilation. ``onnxruntime`` comes with the ``[onnx]`` extra, ``openvino`` with ``[openvino]``;
torch is imported inside the functions, as in ``encoding``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings

import numpy as np

from retrieval_core.config import ConfigError
from retrieval_core.io import file_cache

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999
ONNX_OPSET = 17
CHECK_TEXTS = [
    "A short query",
    "The tumour suppressor protein p53 regulates the cell cycle and apoptosis in response to DNA damage.",
    "Quarterly revenue beat estimates as demand for cloud services grew faster than expected.",
    "x",
]
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
RUNTIMES = {"onnx": ("onnxruntime", "ONNX Runtime"), "openvino": ("openvino", "OpenVINO")}
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def require(backend: str):
    """The runtime module of ``backend``, or a ConfigError naming the extra that brings it."""
    module, _ = RUNTIMES[backend]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(
            f"model.backend = {backend!r} needs the package {module!r}, which is not installed: pip install "
            f"'ray-retrieval-jobs[{backend}]' (or pip install {module})"
        ) from None


def use_exported(model, fingerprint: str, backend: str, precision: str, threads: int, streams: int = 1) -> bool:
    """Run ``model``'s transformer networks in ``backend``'s runtime (``threads`` threads a call; OpenVINO in
    ``precision``, with ``streams`` calls in parallel: the encoder's threads), checked against torch fp32 on
    ``CHECK_TEXTS``; returns whether it does (False: the torch networks stay, and a warning says why)."""
    name = RUNTIMES[backend][1]
    modules = [m for m in model.modules() if type(m).__name__ == "Transformer" and hasattr(m, "model")]
    if not modules:
        log.warning("model.backend = %r: the model has no transformer module to export; torch encodes it", backend)
        return False
    reference = model.encode(CHECK_TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    originals = [m.model for m in modules]
    try:
        require(backend)  # missing on this machine (a worker unlike the one probed): torch, with a warning
        for number, module in enumerate(modules):
            path = _exported(module, f"{fingerprint}-{number}")
            module.model = network(path, module.model.config, backend, precision, threads, streams)
        got = model.encode(CHECK_TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    except Exception as exc:  # noqa: BLE001 - any export or run failure falls back to torch, said once
        _restore(modules, originals)
        log.warning("model.backend = %r: %s; torch encodes the model", backend, str(exc).strip().splitlines()[0])
        return False
    cosine = float(np.min(np.sum(got * reference, axis=1)))
    if not (np.isfinite(got).all() and cosine >= MIN_COSINE):  # NaN compares False: refused too
        _restore(modules, originals)
        log.warning(
            "model.backend = %r: cosine %.6f to torch < %s; torch encodes the model", backend, cosine, MIN_COSINE
        )
        return False
    log.info(
        "model.backend = %r: %s encodes the model in %s (cosine to torch >= %.7f)", backend, name, precision, cosine
    )
    return True


def _restore(modules: list, originals: list) -> None:
    for module, original in zip(modules, originals):
        module.model = original


def _exported(module, key: str) -> str:
    """The ONNX file of ``module``'s network, exported once per node and kept in the file cache."""
    return file_cache.made_once(os.path.join("onnx", f"{key}.onnx"), lambda path: _export(module, path))


def _export(module, path: str) -> None:
    import torch

    network = module.model.eval()
    sample = module.tokenizer(["an example", "a second, longer example sentence"], padding=True, return_tensors="pt")
    names = [name for name in INPUTS if name in sample]

    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.network = network

        def forward(self, *inputs):
            return self.network(**dict(zip(names, inputs)), return_dict=True).last_hidden_state

    attention = getattr(network.config, "_attn_implementation", None)
    _set_attention(network, "eager")  # traced as plain matrix products, which both runtimes run faster than SDPA's
    try:
        _trace(Network(), sample, names, path)
    finally:
        _set_attention(network, attention)


def _trace(network, sample, names: list[str], path: str) -> None:
    import torch

    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on data-dependent branches of the attention code
        torch.onnx.export(
            network,
            tuple(sample[name] for name in names),
            path,
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )


def _set_attention(network, implementation: str | None) -> None:
    """Switch a Hugging Face network's attention implementation (``eager``, ``sdpa``), where it has one."""
    if implementation and hasattr(network, "set_attn_implementation"):
        with contextlib.suppress(Exception):  # a network that offers no other keeps its own
            network.set_attn_implementation(implementation)


def network(path: str, config, backend: str, precision: str, threads: int, streams: int = 1):
    """A torch module standing for a Hugging Face network in a ``Transformer`` module: called with its inputs, it
    returns ``{"last_hidden_state": tensor}`` from ``backend``'s runtime running the ONNX file ``path``."""
    return _network_classes()[backend](path, config, precision, threads, streams)


@functools.lru_cache(maxsize=1)
def _network_classes() -> dict:
    import torch

    class ExportedNetwork(torch.nn.Module):
        runtime = ""

        inputs: list[str]

        def __init__(self, config):
            super().__init__()
            self.config = config

        def run(self, feed: dict) -> np.ndarray:
            raise NotImplementedError

        def forward(self, **features):
            feed = {name: features[name].cpu().numpy().astype(np.int64) for name in self.inputs}
            return {"last_hidden_state": torch.from_numpy(np.ascontiguousarray(self.run(feed)))}

    class OnnxNetwork(ExportedNetwork):
        runtime = "onnx"

        def __init__(self, path: str, config, precision: str, threads: int, streams: int):
            super().__init__(config)
            onnxruntime = require("onnx")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = max(1, threads)
            options.log_severity_level = 3
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]

        def run(self, feed: dict) -> np.ndarray:
            return self.session.run(["last_hidden_state"], feed)[0]  # thread-safe

    class OpenVinoNetwork(ExportedNetwork):
        runtime = "openvino"

        def __init__(self, path: str, config, precision: str, threads: int, streams: int):
            super().__init__(config)
            openvino = require("openvino")
            core = openvino.Core()
            core.set_property({"CACHE_DIR": os.path.join(file_cache.cache_dir(), "openvino")})
            self.compiled = core.compile_model(
                path,
                "CPU",
                {
                    "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
                    "INFERENCE_NUM_THREADS": max(1, threads) * max(1, streams),
                    "NUM_STREAMS": max(1, streams),  # one a calling thread: requests of one stream queue
                    # OpenVINO pins its threads to cores by default: workers of one node would share a core
                    "ENABLE_CPU_PINNING": False,
                },
            )
            self.inputs = [i.get_any_name() for i in self.compiled.inputs]

        def run(self, feed: dict) -> np.ndarray:
            request = self.compiled.create_infer_request()  # one a call: a request is not thread-safe
            return request.infer(feed)[self.compiled.output(0)]

    return {"onnx": OnnxNetwork, "openvino": OpenVinoNetwork}


def runtime_of(module) -> str:
    """``onnx`` or ``openvino`` for a network this module made, else ``""`` (a torch network)."""
    return getattr(module, "runtime", "") if hasattr(module, "run") else ""
