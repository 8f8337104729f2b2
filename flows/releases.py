"""See and move the releases under an output root: list, promote, roll back, path.

    python -m flows.releases list --output outputs/sft-run
    python -m flows.releases promote 20261203T030000Z-3f9a2c1d4e5b --output outputs/sft-run
    python -m flows.releases rollback --output outputs/sft-run
    python -m flows.releases path --output outputs/sft-run     # the production release's folder

The same operations are Prefect flows (`list-releases`, `promote-release`, `rollback-release`),
deployed next to the training deployments so a person can trigger them from the UI. Moving `production` also moves
the MLflow `champion` alias when tracking is configured."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prefect import flow

from schemas.config import TrackingOptions
from tasks import tracking
from tasks.releases import ReleaseError, ReleaseStore


@flow(name="promote-release", log_prints=True)
def promote_release(output: str, release: str, reason: str = "promoted from the Prefect UI",
                    output_storage_options: dict[str, Any] | None = None, tracking_options: TrackingOptions = TrackingOptions()) -> dict:
    """Put `release` (a name under <output>/releases/) in production."""
    entry = ReleaseStore(output, output_storage_options).promote(release, reason)
    tracking.set_champion(tracking_options, release)
    print(f"production -> {release} (was {entry['previous']})")
    return entry


@flow(name="rollback-release", log_prints=True)
def rollback_release(output: str, reason: str = "rolled back from the Prefect UI",
                     output_storage_options: dict[str, Any] | None = None, tracking_options: TrackingOptions = TrackingOptions()) -> dict:
    """Return production to the release it replaced."""
    entry = ReleaseStore(output, output_storage_options).rollback(reason)
    tracking.set_champion(tracking_options, entry["production"])
    print(f"production -> {entry['production']} (rolled back from {entry['previous']})")
    return entry


@flow(name="list-releases", log_prints=True)
def list_releases(output: str, output_storage_options: dict[str, Any] | None = None) -> list[dict]:
    """The releases under `output`, newest first, as a table artifact (and printed)."""
    from prefect.artifacts import create_table_artifact

    rows = ReleaseStore(output, output_storage_options).table()
    print(format_table(rows))
    create_table_artifact(table=rows or [{"release": "none"}], key="sft-releases", description=f"Releases under {output}")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no releases"
    columns = list(rows[0])
    cells = [[("-" if row.get(c) is None else f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.releases", description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("command", choices=["list", "promote", "rollback", "path"])
    parser.add_argument("release", nargs="?", help="promote: the release name (see `list`)")
    parser.add_argument("--output", required=True, help="the release root (the flow's --output)")
    parser.add_argument("--output_storage_options", type=json.loads, default={}, help="fsspec options of the output, as JSON")
    parser.add_argument("--reason", default="", help="why (kept in history.jsonl)")
    args = parser.parse_args(argv)
    store = ReleaseStore(args.output, args.output_storage_options)
    try:
        if args.command == "list":
            print(format_table(store.table()))
        elif args.command == "path":
            name = store.production()
            if name is None:
                raise ReleaseError(f"nothing is in production under {args.output}")
            print(store.release_url(name))
        elif args.command == "promote":
            if not args.release:
                parser.error("promote needs the release name")
            promote_release.fn(args.output, args.release, args.reason or "promoted by hand", args.output_storage_options)
        else:
            rollback_release.fn(args.output, args.reason or "rolled back by hand", args.output_storage_options)
    except ReleaseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
