"""Ray Train: a function run on a group of torch workers, restarted from its checkpoints when a worker fails."""

from __future__ import annotations

from typing import Callable

from jobs.ray import cluster
from retrieval_core.config import RuntimeConfig


def run_on_train_workers(rt: RuntimeConfig, work: Callable[[int, int, str, Callable], int], storage: dict) -> None:
    """``work(rank, world_size, device, barrier)`` on ``runtime.num_workers`` Ray Train workers (each
    ``runtime.cpus_per_worker`` CPUs and ``runtime.gpus_per_worker`` GPUs, torch.distributed set up among them);
    it returns the steps it trained, which each worker reports. The group is restarted up to
    ``runtime.max_restarts`` times; ``storage`` holds RunConfig's storage arguments (its run directory)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        import ray.train
        import ray.train.torch
        import torch.distributed

        context = ray.train.get_context()
        steps = work(
            context.get_world_rank(),
            context.get_world_size(),
            str(ray.train.torch.get_device()),
            torch.distributed.barrier,
        )
        ray.train.report({"steps": steps})

    with cluster.ray_session(rt):
        trainer = TorchTrainer(
            loop,
            scaling_config=ScalingConfig(
                num_workers=rt.num_workers,
                use_gpu=rt.gpus_per_worker > 0,
                resources_per_worker={
                    "CPU": rt.cpus_per_worker,
                    **({"GPU": rt.gpus_per_worker} if rt.gpus_per_worker else {}),
                },
            ),
            run_config=RunConfig(name="train", failure_config=FailureConfig(max_failures=rt.max_restarts), **storage),
        )
        trainer.fit()
