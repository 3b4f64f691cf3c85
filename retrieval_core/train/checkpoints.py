"""Training checkpoints: the state a killed training resumes from, to the weights of an uninterrupted run.

A checkpoint, every ``train.checkpoint_steps`` steps, under ``<train.output>/_checkpoints/``:

- ``step-NNNNNNNN/weights.safetensors``: the model's parameters and buffers;
- ``step-NNNNNNNN/optimizer.safetensors``: the optimizer's per-parameter state (AdamW's moments and step counts);
- ``step-NNNNNNNN/rng-R.safetensors``: each worker's torch random generator (dropout), R = the worker's rank;
- ``latest.json``, written last (the commit record): the step, the epoch and the batch within it, the optimizer's
  hyper-parameters and the schedule's state (JSON), the history so far, and the training's identity.

Nothing is pickled: tensors go through safetensors, everything else through JSON. A checkpoint whose identity is not
the training's (other settings, other negatives) is ignored and removed. torch is imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from retrieval_core.io import storage

log = logging.getLogger(__name__)

DIRECTORY = "_checkpoints"
LATEST = "latest.json"


@dataclasses.dataclass
class Position:
    """Where the training stands: ``step`` steps done, the next one is batch ``batch`` of epoch ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclasses.dataclass
class Checkpoints:
    """The checkpoints of one training at ``url`` (``<train.output>/_checkpoints``), every ``every`` steps (0 =
    none). ``rank``/``world`` name this worker; ``barrier`` (several workers) waits for all of them."""

    url: str
    identity: str
    every: int
    storage_options: dict | None = None
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] | None = None

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < total

    def save(self, model, optimizer, scheduler, position: Position, history: dict) -> None:
        """Write this worker's part of the checkpoint at ``position``; rank 0 commits it once every worker wrote
        its part, then removes the older checkpoints."""
        folder = storage.join(self.url, f"step-{position.step:08d}")
        storage.write_bytes_atomic(
            storage.join(folder, f"rng-{self.rank}.safetensors"), _rng_bytes(model), self.storage_options
        )
        if self.rank == 0:
            weights, moments, groups = _model_bytes(model), *_optimizer_parts(optimizer)
            storage.write_bytes_atomic(storage.join(folder, "weights.safetensors"), weights, self.storage_options)
            storage.write_bytes_atomic(storage.join(folder, "optimizer.safetensors"), moments, self.storage_options)
        if self.barrier:
            self.barrier()
        if self.rank == 0:
            record = {
                "identity": self.identity,
                "folder": f"step-{position.step:08d}",
                "world": self.world,
                **dataclasses.asdict(position),
                "param_groups": groups,
                "scheduler": scheduler.state_dict(),
                "history": history,
            }
            storage.write_json_atomic(storage.join(self.url, LATEST), record, self.storage_options)
            self._remove_all_but(record["folder"])
        if self.barrier:
            self.barrier()

    def restore(self, model, optimizer, scheduler) -> tuple[Position, dict] | None:
        """Load the latest checkpoint of this training into the model, optimizer, schedule and random generator;
        returns (position, history), or None when there is none to resume from."""
        record = self._latest()
        if record is None:
            return None
        folder = storage.join(self.url, record["folder"])
        model.load_state_dict(_tensors(storage.join(folder, "weights.safetensors"), self.storage_options))
        moments = _tensors(storage.join(folder, "optimizer.safetensors"), self.storage_options)
        optimizer.load_state_dict(_optimizer_state(moments, record["param_groups"]))
        scheduler.load_state_dict(record["scheduler"])
        _set_rng(model, _tensors(storage.join(folder, f"rng-{self.rank}.safetensors"), self.storage_options))
        position = Position(record["step"], record["epoch"], record["batch"])
        log.info("resuming the training from its checkpoint at step %d (%s)", position.step, folder)
        return position, record["history"]

    def remove(self) -> None:
        """Drop every checkpoint (the training is complete)."""
        storage.remove(self.url, self.storage_options)

    def _latest(self) -> dict | None:
        url = storage.join(self.url, LATEST)
        if not storage.exists(url, self.storage_options):
            return None
        record = storage.read_json(url, self.storage_options)
        if record.get("identity") != self.identity or record.get("world") != self.world:
            log.warning("ignoring the checkpoint at '%s': it belongs to a training with other settings", url)
            return None
        return record

    def _remove_all_but(self, keep: str) -> None:
        for name in storage.list_names(self.url, self.storage_options):
            if name.startswith("step-") and name != keep:
                storage.remove(storage.join(self.url, name), self.storage_options)


def _model_bytes(model) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()})


def _optimizer_parts(optimizer) -> tuple[bytes, list[dict]]:
    """(the per-parameter state as safetensors, the parameter groups as JSON-ready dicts)."""
    from safetensors.torch import save

    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().cpu().clone().contiguous()
        for index, entry in state["state"].items()
        for key, value in entry.items()
    }
    return save(tensors), state["param_groups"]


def _optimizer_state(tensors: dict, groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]}


def _rng_bytes(model) -> bytes:
    import torch
    from safetensors.torch import save

    tensors = {"cpu": torch.get_rng_state()}
    if model.device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(model.device)
    return save(tensors)


def _set_rng(model, tensors: dict) -> None:
    import torch

    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and model.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["cuda"], model.device)


def _tensors(url: str, storage_options: dict | None) -> dict:
    from safetensors.torch import load

    return load(storage.read_bytes(url, storage_options))
