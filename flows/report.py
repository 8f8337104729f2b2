"""Terminal summaries: dataset statistics for --dry-run, and the end-of-run report with the base vs
tuned answers on held-out prompts."""

from __future__ import annotations

import textwrap
from typing import Any

from tasks.core import storage
from tasks.reporting import metric_rows, number


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[number(value) for value in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [" | ".join(value.ljust(width) for value, width in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def _flatten(stats: dict[str, Any], prefix: str = "") -> list[list[Any]]:
    rows = []
    for key, value in stats.items():
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append([f"{prefix}{key}", value])
    return rows


def format_dataset_stats(validation: dict[str, Any], tokenization: dict[str, Any]) -> str:
    """Rows kept and dropped, token counts, truncation and the share of tokens carrying loss."""
    return "\n\n".join(
        [
            "Validation",
            _table(["statistic", "value"], _flatten(validation)),
            "Tokenization",
            _table(["statistic", "value"], _flatten(tokenization)),
        ]
    )


def format_run_summary(manifest: dict[str, Any], wall_s: float, cache_storage_options: dict[str, Any] | None = None) -> str:
    stages = manifest.get("stages", {})
    parts = [
        f"Run {manifest.get('status')} in {wall_s:.1f} s. Manifest: {manifest.get('manifest_uri')}",
        _table(
            ["stage", "cache", "wall s", "artifact"],
            [[name, entry["cache"], f"{entry['wall_s']:.2f}", entry["uri"]] for name, entry in stages.items()],  # seconds, not a metric
        ),
    ]
    export = stages.get("export", {}).get("stats", {})
    if export:
        parts.append(
            f"Release: {export.get('release') or 'none written'} ({export.get('decision')}); production: "
            f"{export.get('production') or 'none'}; latest: {export.get('latest') or 'none'}"
            + (f"; deleted by retention: {', '.join(export['pruned'])}" if export.get("pruned") else "")
        )
    if manifest.get("status") == "dry-run":
        parts.append(format_dataset_stats(stages["validate-data"]["stats"], stages["tokenize-and-cache"]["stats"]))
    if "evaluate" in stages:
        parts.append(format_comparison(stages["evaluate"]["uri"], cache_storage_options))
    return "\n\n".join(parts)


def format_comparison(eval_uri: str, cache_storage_options: dict[str, Any] | None = None, width: int = 60) -> str:
    """Metrics table and side-by-side answers of the base and tuned models on held-out prompts."""
    metrics = storage.read_json(storage.join(eval_uri, "metrics.json"), cache_storage_options)
    generations = storage.read_json(storage.join(eval_uri, "generations.json"), cache_storage_options)
    base, tuned = metrics["base"], metrics["tuned"]
    rows = [[row["metric"], row["base"], row["tuned"], row["delta"]] for row in metric_rows(base, tuned)]
    lines = [
        "Base vs tuned (held-out rows)",
        _table(["metric", "base", "tuned", "delta"], rows),
        f"eval rows: {base.get('eval_examples', 0)} ({base.get('eval_tokens', 0)} response tokens); "
        f"generated answers: {base.get('num_generated', 0)} (greedy)",
        "",
    ]
    for sample in generations:
        lines.append(f"Q: {_one_line(sample['prompt'], width * 2)}")
        lines.append(f"  base : {_one_line(sample['base'], width * 2)}")
        lines.append(f"  tuned: {_one_line(sample['tuned'], width * 2)}")
    return "\n".join(lines)


def _one_line(text: str, limit: int) -> str:
    return textwrap.shorten(" ".join(str(text).split()), width=limit, placeholder=" ...")
