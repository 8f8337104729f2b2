"""Resumable training: every `checkpoint_every` steps rank 0 publishes the trainable weights
(safetensors), optimizer, scheduler and grad scaler, the RNG states of every rank and the loss curve
so far as one atomic folder; a new run with the same spec restores the newest complete one on every
rank and continues as if it had never stopped.

Saving and loading are collective under FSDP (every rank takes part in gathering or scattering the
full state dicts), so every rank calls them."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from tasks.core import storage

if TYPE_CHECKING:  # the trainer imports this module; Runtime is only a type here
    from tasks.core.trainer import Runtime

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"


class Checkpoints:
    """step-XXXXXXXX folders under one URL, each published atomically with a marker written last."""

    def __init__(self, url: str, keep: int, storage_options: dict[str, Any] | None = None):
        self.url, self.keep, self.storage_options = url, keep, storage_options or {}
        self.protected: set[int] = set()  # kept whatever `keep` says (the best checkpoint)

    def complete_steps(self) -> list[int]:
        fs, path = storage.filesystem(self.url, self.storage_options)
        if not fs.exists(path):
            return []
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
        steps = [int(name[5:]) for name in names if name.startswith("step-") and name[5:].isdigit()]
        return sorted(step for step in steps if storage.is_complete(self.folder(step), self.storage_options))

    def folder(self, step: int) -> str:
        return storage.join(self.url, f"step-{step:08d}")

    def prune(self) -> None:
        """Keep the newest `keep` complete checkpoints; drop older ones and abandoned temp folders."""
        fs, path = storage.filesystem(self.url, self.storage_options)
        for step in [step for step in self.complete_steps()[: -self.keep] if step not in self.protected]:
            fs.rm(storage.filesystem(self.folder(step), self.storage_options)[1], recursive=True)
        if storage.is_local(self.url, self.storage_options) and Path(path).is_dir():
            storage.remove_stale_scratch(Path(path), name="*")  # scratch of writers that were killed

    def remove_all(self) -> None:
        fs, path = storage.filesystem(self.url, self.storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)


@dataclass
class TrainState:
    """Where the loop stands: what progress.json of a checkpoint holds, so a resumed run continues
    its loss curve and token counts."""

    step: int = 0
    curve: list = field(default_factory=list)
    tokens: int = 0
    loss_tokens: int = 0
    train_s: float = 0.0
    resumed_from_step: int = 0
    best_eval_loss: float | None = None  # evaluation during training: the best held-out loss so far,
    best_step: int = 0  # its step (a checkpoint is kept there),
    bad_evals: int = 0  # evaluations since it without an improvement of min_delta,
    stopped: dict | None = None  # and why training stopped early ({"step", "reason"})


def _rng_state(rt: Runtime) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if rt.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(rt.device)
    return state


def _gather(rt: Runtime, value: Any) -> list:
    """Every rank's `value` on rank 0 (an empty list elsewhere)."""
    if rt.world == 1:
        return [value]
    gathered = [None] * rt.world if rt.main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered or []


def _full_state(model, optimizer, trainable_only: bool) -> tuple[dict, dict]:
    """Full (unsharded) state dicts on rank 0, keyed by parameter name (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_state_dict(model, optimizer, options=options)


def unique_tensors(state: dict, model: torch.nn.Module) -> dict:
    """Drop aliases (tied embeddings) so safetensors accepts the dict; loading sets both. FSDP
    gathers tied parameters as separate copies, so aliases are found by parameter identity too."""
    model = getattr(model, "module", model)
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(param), name)
    aliases = {name for name, param in model.named_parameters(remove_duplicate=False) if first[id(param)] != name}
    seen, out = set(), {}
    for name, tensor in state.items():
        if name in aliases:
            continue
        pointer = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if pointer not in seen:
            seen.add(pointer)
            out[name] = tensor.detach().contiguous()
    return out


def save_checkpoint(ckpts: Checkpoints, state: TrainState, model, optimizer, scheduler, scaler, rt: Runtime) -> None:
    """Collective: every rank contributes its RNG state (and shards); rank 0 writes."""
    from safetensors.torch import save_file

    weights, optim_state = _full_state(model, optimizer, trainable_only=True)
    rng = _gather(rt, _rng_state(rt))
    if not rt.main:
        return
    with storage.atomic_directory(ckpts.folder(state.step), ckpts.storage_options) as scratch:
        save_file(unique_tensors(weights, model), str(scratch / TRAINABLE_FILE))
        torch.save(optim_state, scratch / "optimizer.pt")
        extra = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None, "rng": rng}
        torch.save(extra, scratch / "state.pt")
        (scratch / "progress.json").write_text(json.dumps({**asdict(state), "world_size": rt.world}))
    ckpts.prune()


def load_weights(ckpts: Checkpoints, step: int, model) -> None:
    """Put the trainable weights of the checkpoint at `step` into `model` (every rank: the export
    of the best checkpoint)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    folder = storage.local_copy(ckpts.folder(step), ckpts.storage_options)
    set_model_state_dict(model, load_file(str(folder / TRAINABLE_FILE)), options=StateDictOptions(full_state_dict=True, strict=False))


def load_checkpoint(ckpts: Checkpoints, model, optimizer, scheduler, scaler, rt: Runtime) -> TrainState:
    """Restore the newest complete checkpoint on every rank; a fresh TrainState when there is none."""
    steps = ckpts.complete_steps()
    if not steps:
        return TrainState()
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    folder = storage.local_copy(ckpts.folder(steps[-1]), ckpts.storage_options)
    weights = load_file(str(folder / TRAINABLE_FILE))
    optim_state = torch.load(folder / "optimizer.pt", weights_only=True)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_state, options=options)
    extra = torch.load(folder / "state.pt", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra["scaler"]:
        scaler.load_state_dict(extra["scaler"])
    rng = extra["rng"][rt.rank % len(extra["rng"])]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and rt.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], rt.device)
    progress = json.loads((folder / "progress.json").read_text())
    progress.pop("world_size", None)
    state = TrainState(**progress)
    state.resumed_from_step = state.step
    logger.info("Resuming from the checkpoint at step %d (%s)", state.step, ckpts.folder(state.step))
    return state

