"""Where shards run: in this process, in local worker processes (one per core by default), or on
a running Dask cluster.

A runner is `runner(fn, items, done, work=Work(...), **common) -> results in item order`:
`fn(item, **common)` for every item, `done[i]` saying that item's cache entry is already complete
(it is then read in this process: starting a worker for a cache hit would cost more than the hit).
`workers: 0` (automatic) starts processes only when the work to do is big enough to pay for their
start (a few seconds each: they import the stack); an explicit count always does. Without Prefect,
`local_runner` uses a process pool. Inside the flow, `prefect_runner` maps the shard's Prefect task
over Prefect's ProcessPoolTaskRunner or prefect-dask's DaskTaskRunner, so every shard is a task
run with its own cache record, retries and place in the UI.

Shard entries are handed back by URL, so every worker must write where this process reads: a
`memory://` cache lives inside one process and keeps the work here; with a Dask cluster, a
`cache_dir` that the workers cannot share with this process fails the run, naming the entry."""

from __future__ import annotations

import inspect
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from typing import Any, Callable

from schemas.config import DataOptions
from schemas.manifests import ShardArtifact
from tasks.core import storage

ShardRunner = Callable[..., list[ShardArtifact]]
BIG_WORK_BYTES = 16 << 20  # about 20k alpaca rows: below this one process is done before a pool has started

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Work:
    pending_bytes: int  # of the shards that need building (their input's size)
    private: bool = False  # some input lives inside this process (memory://): no other process can read it

    @property
    def big(self) -> bool:
        return self.pending_bytes >= BIG_WORK_BYTES


class SharedStorageError(ValueError):
    """A shard was written where this process cannot read it: the cache is not shared storage."""


def process_private(url: str) -> bool:
    """A location other processes cannot see (fsspec's memory filesystem lives in one process)."""
    return url.startswith("memory://")


def one_core_each() -> None:
    """In a worker process: the fast tokenizer's own thread pool would use every core in every
    worker; with one worker per core, that only makes them fight."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def worker_count(workers: int, pending: int, work: Work, cache_dir: str) -> int:
    """How many processes build the pending shards (1: this one)."""
    if work.private or process_private(cache_dir) or (workers == 0 and not work.big):
        return 1
    return min(workers or os.cpu_count() or 1, pending)


def local_runner(workers: int, cache_dir: str) -> ShardRunner:
    """Shards in a pool of `workers` spawned processes (0: one per core, for big work)."""

    def run(fn: Callable, items: list, done: list[bool], work: Work, **common: Any) -> list[ShardArtifact]:
        results: list[Any] = [fn(item, **common) if finished else None for item, finished in zip(items, done)]
        todo = [index for index, finished in enumerate(done) if not finished]
        processes = worker_count(workers, len(todo), work, cache_dir)
        if processes <= 1:
            for index in todo:
                results[index] = fn(items[index], **common)
            return results
        logger.info("%d shards in %d worker processes", len(todo), processes)
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn"), initializer=one_core_each) as pool:
            for index, result in zip(todo, pool.map(partial(fn, **common), [items[index] for index in todo])):
                results[index] = result
        return require_visible(results, common.get("cache_storage_options"))

    return run


def prefect_runner(task: Any, options: DataOptions, cache_dir: str) -> ShardRunner:
    """Shards as runs of `task`: mapped over a Dask cluster (options.dask_address), over local
    worker processes (options.workers; automatic: big work only), or called here one by one."""

    def run(fn: Callable, items: list, done: list[bool], work: Work, **common: Any) -> list[ShardArtifact]:
        results: list[Any] = [task(item, **common) if finished else None for item, finished in zip(items, done)]
        todo = [index for index, finished in enumerate(done) if not finished]
        task_runner = _task_runner(options, cache_dir, len(todo), work)
        if task_runner is None:
            for index in todo:
                results[index] = task(items[index], **common)
            return results
        from prefect.utilities.annotations import unmapped

        first = next(iter(inspect.signature(task.fn).parameters))
        parameters = {first: [items[index] for index in todo], **{name: unmapped(value) for name, value in common.items()}}
        with task_runner:
            futures = task_runner.map(task, parameters)
            for index, future in zip(todo, futures):
                results[index] = future.result()
        return require_visible(results, common.get("cache_storage_options"))

    return run


def _task_runner(options: DataOptions, cache_dir: str, pending: int, work: Work) -> Any:
    if options.dask_address:
        if process_private(cache_dir) or work.private:
            raise SharedStorageError(
                f"cache_dir {cache_dir} or an input lives inside this process (memory://): Dask workers cannot reach it. "
                "Give them storage they share with this process (s3://, gs://, or one shared path)"
            )
        if not pending:
            return None
        from prefect_dask import DaskTaskRunner

        logger.info("%d shards on the Dask cluster at %s", pending, options.dask_address)
        return DaskTaskRunner(address=options.dask_address)
    processes = worker_count(options.workers, pending, work, cache_dir)
    if processes <= 1:
        return None
    from prefect.task_runners import ProcessPoolTaskRunner

    logger.info("%d shards in %d worker processes", pending, processes)
    return ProcessPoolTaskRunner(max_workers=processes, initializer=one_core_each)


def require_visible(results: list[ShardArtifact], cache_options: dict[str, Any] | None) -> list[ShardArtifact]:
    """Every shard entry complete where this process looks: a worker that wrote to its own disk
    (a local cache_dir on another machine) fails the run here, with the entry it cannot see."""
    for result in results:
        if not storage.is_complete(result.uri, cache_options):
            raise SharedStorageError(
                f"{result.uri}: a worker built this shard, but this process cannot see it. With workers on other machines "
                "cache_dir must be storage they share with this process (s3://, gs://, or one shared path)"
            )
    return results
