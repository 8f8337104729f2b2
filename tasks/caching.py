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
        # The URL is part of the key: two cache dirs sharing one result storage never swap entries.
        prefect_key = f"{context.task.name}-{key[:32]}-{hashing.hash_json(url)[:12]}"
        options = parameters.get(storage_options_param) if storage_options_param else None
        if storage.is_complete(url, options):
            return prefect_key
        store = getattr(context, "result_store", None)
        if store is not None and store.exists(prefect_key):
            return None  # a record for an entry that is gone: run the stage instead of trusting it
        return prefect_key

    return cache_key
