"""train: LoRA or full fine-tuning on the tokenized store, resumable, one device or torchrun.

The work happens in `tasks.core.trainer`, run by `tasks.core.launcher` (no Prefect or pydantic
there, so it also runs on bare GPU boxes); this module names the cache entry, hands the launcher a
spec and describes the result. Checkpoints live beside the entry (`train/<key>.checkpoints`), so a
Prefect retry or the same command run again after a crash resumes where the last checkpoint left
off."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

from prefect import task

from schemas.config import TrainOptions
from schemas.manifests import ModelArtifact, TokenizedArtifact, TrainArtifact
from tasks.artifacts import in_prefect_run
from tasks.core import checkpoints, collate, hashing, launcher, storage, train_settings, trainer
from tasks.retrying import cached_stage

logger = logging.getLogger(__name__)

# Options that cannot change the trained weights: where the rendezvous is, which node this is,
# how often and how many checkpoints are kept, and recomputing activations instead of storing them.
NOT_IN_KEY = ("node_rank", "rdzv_endpoint", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing", "micro_batch_tokens")
LOG_EVERY = 10  # steps between loss lines in the run log


def train_entry(
    tokenized: TokenizedArtifact, model: ModelArtifact, options: TrainOptions, cache_dir: str, trust_remote_code: bool = False
) -> tuple[str, str]:
    """(key, url) of the trained weights: data, model, every option that changes the result, code.

    The batch enters as its effective size only: the loss is normalised over the whole
    accumulated batch, so 4 x 2 trains the same weights as 8 x 1, and an out-of-memory retry that
    splits the micro-batch keeps the key (and the checkpoints it resumes from). trust_remote_code
    enters too: for a repository with both its own code and a transformers class, it picks which
    modeling code trains."""
    values = {name: value for name, value in options.model_dump(mode="json").items() if name not in NOT_IN_KEY}
    values["effective_batch"] = values.pop("micro_batch_size") * values.pop("grad_accum")
    key = hashing.hash_parts("train", tokenized.key, model.key, values, trust_remote_code, CODE_VERSION)[:24]
    return key, storage.join(cache_dir, "train", key)


def checkpoint_url(cache_dir: str, key: str) -> str:
    return storage.join(cache_dir, "train", key + ".checkpoints")


def train_model(
    tokenized: TokenizedArtifact,
    model: ModelArtifact,
    options: TrainOptions,
    cache_dir: str,
    progress: Callable[[dict], None] | None = None,
    trust_remote_code: bool = False,
    cache_storage_options: dict[str, Any] | None = None,
) -> TrainArtifact:
    """Train (or reuse a complete entry) and describe the result. `cache_storage_options` (the
    fsspec options of `cache_dir`) reach the training core through the spec, never the key."""
    key, url = train_entry(tokenized, model, options, cache_dir, trust_remote_code)
    if storage.is_complete(url, cache_storage_options):
        return _artifact(key, url, options, True, cache_storage_options)
    launcher.train(train_spec(tokenized, model, options, cache_dir, trust_remote_code, cache_storage_options), progress)
    return _artifact(key, url, options, False, cache_storage_options)


def train_spec(
    tokenized: TokenizedArtifact,
    model: ModelArtifact,
    options: TrainOptions,
    cache_dir: str,
    trust_remote_code: bool = False,
    cache_storage_options: dict[str, Any] | None = None,
) -> trainer.TrainSpec:
    """What the training core (in this process or under torchrun) is told to do."""
    key, url = train_entry(tokenized, model, options, cache_dir, trust_remote_code)
    return trainer.TrainSpec(
        model_dir=str(storage.local_copy(model.uri, cache_storage_options)),
        data_dir=str(storage.local_copy(tokenized.uri, cache_storage_options)),
        output_url=url,
        checkpoint_url=checkpoint_url(cache_dir, key),
        settings=options.settings(),
        run_id=key[:16],
        trust_remote_code=trust_remote_code,
        storage_options=dict(cache_storage_options or {}),
    )


def _artifact(key: str, url: str, options: TrainOptions, store_hit: bool, storage_options: dict[str, Any] | None) -> TrainArtifact:
    stats_url = storage.join(url, "train_stats.json")
    stats = storage.read_json(stats_url, storage_options) if storage.exists(stats_url, storage_options) else {}
    return TrainArtifact(
        stage="train",
        uri=url,
        key=key,
        method=options.method,
        loss_curve_uri=storage.join(url, "loss_curve.json"),
        stats=stats,
        store_hit=store_hit,
    )


# The code that decides the trained weights: the loop, how it resumes, the defaults and the batches.
CODE_VERSION = hashing.code_version(sys.modules[__name__], trainer, checkpoints, train_settings, collate)


class PrefectProgress:
    """Progress callback for a Prefect run: a progress artifact, and the loss in the run log every
    LOG_EVERY steps. Outside a flow or task run it only logs to the module logger."""

    def __init__(self, log_every: int = LOG_EVERY, min_interval_s: float = 2.0):
        self.in_run = in_prefect_run()
        self.log_every, self.min_interval_s = log_every, min_interval_s
        self.artifact_id, self.last_update = None, 0.0
        self.eval_line = ""  # the last held-out loss (train.eval_every), shown with the progress
        self.log = self._logger()

    def _logger(self):
        if self.in_run:
            from prefect import get_run_logger

            return get_run_logger()
        return logger

    def __call__(self, event: dict) -> None:
        if event.get("event") == "log":
            self.log.debug("%s", event["line"])
            return
        if event.get("event") != "step":
            return
        step, total = event["step"], event["total_steps"]
        if "eval_loss" in event:
            self.log.info("step %d/%d held-out loss %.4f", step, total, event["eval_loss"])
            self.eval_line = f"held-out loss {event['eval_loss']:.4f} at step {step}"
        if step % self.log_every == 0 or step == total:
            self.log.info(
                "step %d/%d loss %.4f lr %.2e %.0f tokens/s, ETA %.0f s",
                step, total, event["loss"], event["lr"], event["tokens_per_s"], event["eta_s"],
            )
        stopped = bool(event.get("stopped"))  # early stopping: training is over before `total`
        if stopped:
            self.eval_line = f"{self.eval_line}; stopped early at step {step}".lstrip("; ")
        self._update_artifact(100.0 if stopped else 100.0 * step / total, step == total or stopped)

    def _eval_note(self) -> str:
        return f" (last {self.eval_line})" if self.eval_line else ""

    def _update_artifact(self, percent: float, final: bool) -> None:
        if not self.in_run or (not final and time.monotonic() - self.last_update < self.min_interval_s):
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, description=f"Training progress{self._eval_note()}")
            else:
                update_progress_artifact(self.artifact_id, percent, description=f"Training progress{self._eval_note()}")
        except Exception as error:  # progress is cosmetic; never fail training over it
            logger.debug("progress artifact update failed: %s", error)
        self.last_update = time.monotonic()


def split_micro_batch(options: TrainOptions) -> TrainOptions | None:
    """The same effective batch in micro-batches half the size, or None when they cannot shrink."""
    if options.micro_batch_size == 1:
        return None
    half = options.micro_batch_size // 2
    accum = options.grad_accum * options.micro_batch_size // half
    if half * accum != options.micro_batch_size * options.grad_accum:
        return None  # an odd micro-batch cannot be halved without changing the effective batch
    return options.model_copy(update={"micro_batch_size": half, "grad_accum": accum})


def train_until_it_fits(
    tokenized: TokenizedArtifact,
    model: ModelArtifact,
    options: TrainOptions,
    cache_dir: str,
    progress: Callable[[dict], None] | None = None,
    trust_remote_code: bool = False,
    cache_storage_options: dict[str, Any] | None = None,
) -> TrainArtifact:
    """train_model, halving the micro-batch and doubling accumulation after each CUDA OOM; the
    effective batch, the cache key and the checkpoints to resume from stay the same."""
    while True:
        try:
            return train_model(tokenized, model, options, cache_dir, progress, trust_remote_code, cache_storage_options)
        except Exception as error:
            smaller = split_micro_batch(options) if trainer.is_out_of_memory(error) else None
            if smaller is None:
                raise
            logger.warning(
                "out of memory at micro-batch %d; retrying with %d x %d accumulation",
                options.micro_batch_size, smaller.micro_batch_size, smaller.grad_accum,
            )
            options = smaller
            _release_cuda_memory()


def _release_cuda_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@task(**cached_stage("train", train_entry, delays=(5, 30)))
def train_task(
    tokenized: TokenizedArtifact,
    model: ModelArtifact,
    options: TrainOptions,
    cache_dir: str,
    trust_remote_code: bool = False,
    cache_storage_options: dict[str, Any] | None = None,
) -> TrainArtifact:
    return train_until_it_fits(tokenized, model, options, cache_dir, PrefectProgress(), trust_remote_code, cache_storage_options)
