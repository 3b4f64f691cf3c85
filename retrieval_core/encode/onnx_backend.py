"""``model.backend: onnx``: the transformer networks of a local sentence-transformers model run in ONNX Runtime.

Only the networks change. Each ``Transformer`` module of the model (one, or one per side of a Router) gets, in place
of its Hugging Face network, a small module that runs the same network exported to ONNX; tokenization, prompts,
pooling, truncation and normalization stay sentence-transformers' own. So the vectors are the model's, to float
rounding: before use, a few sentences are encoded both ways, and a cosine under ``MIN_COSINE`` (or an export that
fails) puts the torch networks back, with a warning saying why. The export (``torch.onnx.export``, the TorchScript
exporter, dynamic batch and sequence axes) is made once per node and model: it is cached under the file cache
(``$RETRIEVAL_FILE_CACHE``) by the model's fingerprint, under a file lock. ``onnxruntime`` comes with the ``[onnx]``
extra; torch is imported inside the functions, as in ``encoding``.
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


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "model.backend = 'onnx' needs the package 'onnxruntime', which is not installed: pip install "
            "'ray-retrieval-jobs[onnx]' (or pip install onnxruntime onnx)"
        ) from None
    return onnxruntime


def use_onnx(model, fingerprint: str, threads: int) -> bool:
    """Run ``model``'s transformer networks in ONNX Runtime (``threads`` intra-op threads a session), checked
    against torch on ``CHECK_TEXTS``; returns whether it does (False: the torch networks stay, and a warning says
    why)."""
    require_onnxruntime()
    modules = [m for m in model.modules() if type(m).__name__ == "Transformer" and hasattr(m, "model")]
    if not modules:
        log.warning("model.backend = 'onnx': the model has no transformer module to export; torch encodes it")
        return False
    reference = model.encode(CHECK_TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    originals = [m.model for m in modules]
    try:
        for number, module in enumerate(modules):
            network = onnx_network(_exported(module, f"{fingerprint}-{number}"), module.model.config, threads)
            module.model = network
        got = model.encode(CHECK_TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    except Exception as exc:  # noqa: BLE001 - any export or run failure falls back to torch, said once
        _restore(modules, originals)
        log.warning("model.backend = 'onnx': %s; torch encodes the model", str(exc).strip().splitlines()[0])
        return False
    cosine = float(np.min(np.sum(got * reference, axis=1)))
    if cosine < MIN_COSINE:
        _restore(modules, originals)
        log.warning("model.backend = 'onnx': cosine %.6f to torch < %s; torch encodes the model", cosine, MIN_COSINE)
        return False
    log.info("model.backend = 'onnx': ONNX Runtime encodes the model (cosine to torch >= %.7f)", cosine)
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

    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    attention = getattr(network.config, "_attn_implementation", None)
    _set_attention(network, "eager")  # traced as plain matrix products, which ONNX Runtime runs faster than SDPA's
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on data-dependent branches of the attention code
        torch.onnx.export(
            Network(),
            tuple(sample[name] for name in names),
            path,
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    _set_attention(network, attention)


def _set_attention(network, implementation: str | None) -> None:
    """Switch a Hugging Face network's attention implementation (``eager``, ``sdpa``), where it has one."""
    if implementation and hasattr(network, "set_attn_implementation"):
        with contextlib.suppress(Exception):  # a network that offers no other keeps its own
            network.set_attn_implementation(implementation)


def onnx_network(path: str, config, threads: int):
    """A torch module standing for a Hugging Face network in a ``Transformer`` module: called with its inputs, it
    returns ``{"last_hidden_state": tensor}`` from an ONNX Runtime session of ``path`` (``threads`` intra-op
    threads)."""
    return _network_class()(path, config, threads)


@functools.lru_cache(maxsize=1)
def _network_class():
    import torch

    class OnnxNetwork(torch.nn.Module):
        def __init__(self, path: str, config, threads: int):
            super().__init__()
            onnxruntime = require_onnxruntime()
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = max(1, threads)
            options.log_severity_level = 3
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.config = config

        def forward(self, **features):
            feed = {name: features[name].cpu().numpy().astype(np.int64) for name in self.inputs}
            (hidden,) = self.session.run(["last_hidden_state"], feed)
            return {"last_hidden_state": torch.from_numpy(hidden)}

    return OnnxNetwork


def is_onnx_network(module) -> bool:
    return type(module).__name__ == "OnnxNetwork" and hasattr(module, "session")
