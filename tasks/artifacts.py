"""Prefect artifacts (tables, reports, links) published by the stages for the UI.

A stage publishes its artifacts from inside its task run. A cache hit skips the task body, so the
flow publishes the cached result's artifacts again itself: every run page shows every report."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

logger = logging.getLogger(__name__)


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def publisher(what: str) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Decorate a stage's `publish(result)`: it runs only inside a flow or task run, and a failure
    is logged, never raised (the artifacts are a view of results that are already stored)."""

    def decorate(publish: Callable[[Any], None]) -> Callable[[Any], None]:
        @functools.wraps(publish)
        def guarded(result: Any) -> None:
            if not in_prefect_run():
                return
            try:
                publish(result)
            except Exception:  # noqa: BLE001
                logger.warning("Could not publish the %s artifact", what, exc_info=True)

        return guarded

    return decorate
