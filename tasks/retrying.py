"""Which failures a stage retries: only those another attempt can get past.

A missing model folder, bad data, weights refused as pickles or every row too long fail the same
way every time; retrying them only adds the retry delays (12 to 40 s) before the same error.
Transient failures are retried: I/O that may work next time (a network filesystem, an object
store, a connection), device memory, a training process that was killed or preempted (the retry
resumes from its last checkpoint), and an input file that changed while the stage read it."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from tasks.caching import EntryFn, InputsChangedError, content_cache_key
from tasks.core.shards import ShardChangedError
from tasks.core.trainer import WorkerError, is_out_of_memory

# OSErrors that say the same thing on every attempt.
PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def is_transient(error: BaseException | None) -> bool:
    if error is None or isinstance(error, ValueError):
        return False  # our deterministic errors (data, model source, refused targets) are ValueErrors
    if isinstance(error, (InputsChangedError, ShardChangedError, ConnectionError, TimeoutError)):
        return True
    if (isinstance(error, WorkerError) and error.crashed) or is_out_of_memory(error):
        return True
    return isinstance(error, OSError) and not isinstance(error, PERMANENT_OS_ERRORS)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed attempt only when its error is transient."""
    error = state.data if isinstance(state.data, BaseException) else None
    return is_transient(error)


def retry_transient_shard(task: Any, task_run: Any, state: Any) -> bool:
    """A shard's: as a stage's, except for a shard whose file changed after it was planned; that
    plan is stale, so the stage retries instead (it plans again)."""
    return retry_transient(task, task_run, state) and not isinstance(state.data, ShardChangedError)


def cached_stage(
    name: str, entry: EntryFn, delays: Sequence[float] = (2, 10), retry_condition: Callable[..., bool] = retry_transient
) -> dict[str, Any]:
    """The `@task` options of a cached stage: Prefect's cache key is the stage's content key (its
    entry function's), results persist, and transient errors are retried once per delay."""
    return {
        "name": name,
        "cache_key_fn": content_cache_key(entry, "cache_storage_options"),
        "persist_result": True,
        "retries": len(delays),
        "retry_condition_fn": retry_condition,
        "retry_delay_seconds": list(delays),
    }
