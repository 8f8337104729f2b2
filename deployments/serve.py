"""Serve the deployments of `deployments/prefect.yaml` from this one process: no work pool, no worker.

    python -m deployments.serve                 # every deployment, the nightly schedule included
    python -m deployments.serve --only manual   # just the UI-triggered one

The deployments are read from prefect.yaml itself (names, descriptions, tags, cron schedules,
parameters, concurrency), so `prefect deploy` and this entry can never drift apart. Flow runs
execute as subprocesses of this process, `--limit` at a time (default 1). The `gpu` tag
concurrency limit that the GPU stages honour is created with `--gpu-slots` slots when the server
does not have one yet; an existing limit is left as it is."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

PREFECT_FILE = Path(__file__).with_name("prefect.yaml")


def load_deployment_specs(prefect_file: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The `deployments:` entries, with `{{ $ENV_VAR }}` placeholders filled in as `prefect deploy` does."""
    from prefect.utilities.templating import apply_values

    specs = yaml.safe_load(prefect_file.read_text())["deployments"]
    return apply_values(specs, os.environ, remove_notset=False)


def _schedules(spec: dict[str, Any]) -> list[Any]:
    from prefect.schedules import Cron

    schedules = []
    for entry in spec.get("schedules") or []:
        if "cron" not in entry:
            raise ValueError(f"deployment {spec['name']!r}: serve supports cron schedules, got {entry}")
        schedules.append(Cron(entry["cron"], timezone=entry.get("timezone"), active=entry.get("active", True)))
    return schedules


def _concurrency(spec: dict[str, Any]) -> Any:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    limit = spec.get("concurrency_limit")
    return ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit


def entrypoint_flow(entrypoint: str) -> Any:
    """The flow object a prefect.yaml entrypoint (`flows/sft.py:sft`) names."""
    import importlib

    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def build_deployments(specs: list[dict[str, Any]], only: list[str] | None = None) -> list[Any]:
    """One `RunnerDeployment` per prefect.yaml entry, of the flow its entrypoint names (work pools
    do not apply here)."""
    unknown = set(only or []) - {spec["name"] for spec in specs}
    if unknown:
        raise ValueError(f"no such deployment in {PREFECT_FILE.name}: {', '.join(sorted(unknown))}")
    return [
        entrypoint_flow(spec["entrypoint"]).to_deployment(
            name=spec["name"],
            description=spec.get("description"),
            tags=spec.get("tags"),
            version=spec.get("version"),
            schedules=_schedules(spec),
            concurrency_limit=_concurrency(spec),
            parameters=spec.get("parameters") or {},
            enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
        )
        for spec in specs
        if not only or spec["name"] in only
    ]


def ensure_gpu_limit(slots: int) -> None:
    """Create the `gpu` tag concurrency limit unless the server already has one (never resized here)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.sft import GPU_TAG

    with get_client(sync_client=True) as client:
        try:
            client.read_concurrency_limit_by_tag(GPU_TAG)
        except ObjectNotFound:
            client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=slots)
            print(f"Created the {GPU_TAG!r} concurrency limit with {slots} slot(s).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="Serve only this deployment (repeatable).")
    parser.add_argument("--limit", type=int, default=1, help="Flow runs this process executes at once (default 1).")
    parser.add_argument(
        "--gpu-slots", type=int, default=1, help="Slots of the 'gpu' limit if it must be created; 0: do not create it."
    )
    parser.add_argument("--prefect-file", type=Path, default=PREFECT_FILE, help="Where the deployments are declared.")
    args = parser.parse_args(argv)

    from prefect import serve

    deployments = build_deployments(load_deployment_specs(args.prefect_file), args.only)
    if args.gpu_slots > 0:
        ensure_gpu_limit(args.gpu_slots)
    serve(*deployments, limit=args.limit)


if __name__ == "__main__":
    sys.exit(main())
