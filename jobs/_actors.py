"""Ray actor classes: each holds what is expensive to build (a model) and calls library functions."""
from __future__ import annotations

import os

import ray

from retrieval_core.config import Config, ModelConfig, RuntimeConfig
from retrieval_core.sharding import Shard


class EncodeWorker:
    """Loads the encoder once, then encodes and commits shards."""

    def __init__(self, model_cfg: ModelConfig, cpus: int, gpus: float):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from retrieval_core import encoding

        encoding.quiet_model_loading()
        encoding.set_torch_threads(cpus)
        self.encoder = encoding.SentenceTransformerEncoder(model_cfg, encoding.pick_device(gpus))

    def encode_shard(self, shard: Shard, cfg: Config, encoder_identity: dict) -> dict:
        from retrieval_core.embeddings import encode_shard

        worker = {"node_id": ray.get_runtime_context().get_node_id()}
        return encode_shard(shard, cfg, self.encoder, encoder_identity, worker)

    def pid(self) -> int:
        return os.getpid()


def start_encode_workers(cfg: Config, count: int) -> list:
    rt: RuntimeConfig = cfg.runtime
    remote = ray.remote(EncodeWorker).options(
        num_cpus=rt.cpus_per_worker, num_gpus=rt.gpus_per_worker,
        max_restarts=rt.max_restarts, max_task_retries=rt.max_task_retries)
    return [remote.remote(cfg.model, rt.cpus_per_worker, rt.gpus_per_worker) for _ in range(count)]
