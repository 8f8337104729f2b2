"""Prefect cache keys that are the stages' own content keys.

Every stage has an `<stage>_entry(...) -> (key, url)` function that computes its content key from
its inputs and names the cache entry the key maps to. The same function keys Prefect's task cache,
so a fresh PREFECT_HOME still hits (the lookup reads result storage, not the database).

A Prefect record only ever points at the entry's own URL, which is a function of the key, so it is
right exactly when that entry is complete. When the entry is missing or half-written while a record
exists, the key function returns None: Prefect skips its lookup, the task runs and the stage
rebuilds the entry, after which the old record is right again."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from tasks.core import hashing, storage

EntryFn = Callable[..., tuple[str, str]]


def content_cache_key(entry: EntryFn, storage_options_param: str | None = None) -> Callable[[Any, dict[str, Any]], str | None]:
    """Build a Prefect `cache_key_fn` from a stage's entry function.

    `entry` receives the task's parameters (those it accepts by name) and returns (key, url)."""
    accepted = set(inspect.signature(entry).parameters)

    def cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
        key, url = entry(**{name: value for name, value in parameters.items() if name in accepted})
        prefect_key = record_key(context.task.name, key, url)
        options = parameters.get(storage_options_param) if storage_options_param else None
        if storage.is_complete(url, options):
            return prefect_key
        store = getattr(context, "result_store", None)
        if store is not None and store.exists(prefect_key):
            return None  # a record for an entry that is gone: run the stage instead of trusting it
        return prefect_key

    return cache_key


def record_key(task_name: str, key: str, url: str) -> str:
    """The Prefect cache key of a stage's entry. The URL is part of it: two cache dirs sharing one
    result storage never swap entries."""
    return f"{task_name}-{key[:32]}-{hashing.hash_json(url)[:12]}"


class InputsChangedError(RuntimeError):
    """The stage's inputs changed between Prefect's cache key and the stage's own read."""


def ensure_record_matches(key: str, url: str) -> None:
    """Inside a cached task run, after the body built the entry (key, url) from what it read: raise
    when Prefect is about to record the result under another key, i.e. an input file changed after
    Prefect hashed it. Nothing is recorded for a failed attempt, and the retry hashes again."""
    from prefect.context import TaskRunContext
    from prefect.transactions import get_transaction

    context, transaction = TaskRunContext.get(), get_transaction()
    if context is None or transaction is None or not transaction.key:
        return
    if transaction.key != record_key(context.task.name, key, url):
        raise InputsChangedError(f"{context.task.name}: an input changed while the stage ran ({url}); run it again")
