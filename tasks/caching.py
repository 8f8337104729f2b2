"""Prefect cache keys that are the stages' own content keys.

Every stage has an `<stage>_entry(...) -> (key, url)` function that computes its content key from
its inputs and names the cache entry the key maps to. The same function keys Prefect's task cache,
so a fresh PREFECT_HOME still hits (the lookup reads result storage, not the database). A Prefect
hit is only allowed while the entry it points to is complete: a deleted or half-written entry
makes the key function return None, the task runs, and the stage rebuilds the entry."""

from __future__ import annotations

from typing import Any, Callable

from tasks.core import storage

EntryFn = Callable[..., tuple[str, str]]


def content_cache_key(entry: EntryFn, storage_options_param: str | None = None) -> Callable[[Any, dict[str, Any]], str | None]:
    """Build a Prefect `cache_key_fn` from a stage's entry function.

    `entry` receives the task's parameters (those it accepts by name) and returns (key, url)."""
    import inspect

    accepted = set(inspect.signature(entry).parameters)

    def cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
        key, url = entry(**{name: value for name, value in parameters.items() if name in accepted})
        options = parameters.get(storage_options_param) if storage_options_param else None
        if not storage.is_complete(url, options):
            return None
        return f"{context.task.name}-{key}"

    return cache_key
