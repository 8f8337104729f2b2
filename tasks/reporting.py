"""What people read about a run, written one way for the evaluation report, the model card, the
Prefect artifacts and the terminal: numbers (`number`), data text in markdown (`cell`, `code`),
the base vs tuned metric table, the training loss plot and the evaluation report."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

from schemas.manifests import TrainArtifact
from tasks.core import storage
from tasks.core.scoring import REPORTED, delta, finite

logger = logging.getLogger(__name__)

# Characters that would end a table cell, start HTML (a `<!--` hides everything after it) or
# change the formatting of text taken from the data; a backslash is escaped first so that data
# ending in one cannot unescape the `\|` that follows.
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>&|~])")


def number(value: Any) -> str:
    """The one way a value is shown: floats to 4 decimals, None as '-', anything else as str."""
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def cell(value: Any) -> str:
    """A markdown table cell: numbers via `number`, text shown literally on one line."""
    if value is None or isinstance(value, (int, float)):
        return number(value)
    text = MARKDOWN_SPECIAL.sub(r"\\\1", str(value))
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def code(text: str) -> str:
    """Inline code that holds any text: a fence longer than its longest run of backticks."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def metric_rows(base: dict, tuned: dict) -> list[dict]:
    """The (metric, base, tuned, delta) table, non-finite values as None."""
    change = delta(base, tuned)
    clean = lambda v: round(v, 6) if finite(v) else None  # noqa: E731
    return [
        {"metric": k, "base": clean(base.get(k)), "tuned": clean(tuned.get(k)), "delta": clean(change.get(k))}
        for k in REPORTED
        if k in base or k in tuned
    ]


def metric_table(base: dict, tuned: dict) -> list[str]:
    """`metric_rows` as markdown lines; no lines when nothing was measured (evaluation disabled)."""
    rows = metric_rows(base, tuned)
    if not rows:
        return []
    lines = ["| metric | base | tuned | delta |", "|---|---|---|---|"]
    return lines + ["| " + " | ".join([row["metric"], *(number(row[k]) for k in ("base", "tuned", "delta"))]) + " |" for row in rows]


def comparison_table(comparison: dict) -> list[str]:
    """Champion vs challenger on the gate's metric: the decision in one table (empty when the gate
    was not applied)."""
    if not comparison:
        return []
    better = "lower" if comparison["lower_is_better"] else "higher"
    return [
        f"| gate metric ({better} is better) | champion | challenger | delta | decision |", "|---|---|---|---|---|",
        f"| {comparison['metric']} | {cell(comparison['champion'])}: {number(comparison['champion_value'])} | "
        f"{number(comparison['challenger_value'])} | {number(comparison['delta'])} | **{comparison['decision']}** |",
    ]


def render_report(base: dict, tuned: dict, generations: list[dict], passed: bool, message: str, image: str,
                  comparison: dict | None = None) -> str:
    """The evaluation report (report.md and the Prefect artifact): gate, metrics, loss plot, answers."""
    lines = ["# Evaluation: base vs tuned", "", f"**Quality gate: {'PASSED' if passed else 'FAILED'}** - {message}", ""]
    if comparison:
        lines += ["## Champion vs challenger", "", *comparison_table(comparison), ""]
    table = metric_table(base, tuned)
    if table:
        lines += [*table, "", f"Eval rows: {base.get('eval_examples', 0)} ({base.get('eval_tokens', 0)} response tokens); "
                  f"generated answers: {base.get('num_generated', 0)} (greedy){_tool_call_note(base)}. "
                  "eval_loss and perplexity: lower is better."]
    lines += ["", "## Training loss", "", f"![loss curve]({image})", ""]
    if generations:
        lines += ["## Sample generations", "", *_generation_table(generations)]
    return "\n".join(lines) + "\n"


def _tool_call_note(scores: dict) -> str:
    count = scores.get("num_tool_call_references")
    return f", {count} of them with a reference that ends in tool calls (the tool_* metrics)" if count else ""


def _generation_table(generations: list[dict]) -> list[str]:
    """prompt | reference | base | tuned, and a column saying which model made exactly the expected
    calls when any reference ends in tool calls (rows without calls show '-' there)."""
    columns = ("prompt", "reference", "base", "tuned")
    with_calls = any("expected_calls" in g for g in generations)
    header = [*columns, *(["calls right (base / tuned)"] if with_calls else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in generations:
        cells = [cell(g[k]) for k in columns]
        if with_calls:
            cells.append(_calls_right(g))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _calls_right(generation: dict) -> str:
    if "expected_calls" not in generation:
        return "-"
    return " / ".join("yes" if generation[f"{model}_calls_right"] else "no" for model in ("base", "tuned"))


def read_loss_curve(trained: TrainArtifact, storage_options: dict[str, Any] | None = None) -> list[dict]:
    """The training loss records ({step, loss, lr, tokens}); none when train wrote no curve."""
    try:
        records = storage.read_json(trained.loss_curve_uri, storage_options)
    except FileNotFoundError:
        logger.warning("No loss curve at %s", trained.loss_curve_uri)
        return []
    return [r for r in records if isinstance(r, dict) and "step" in r]


def plot_loss_curve(records: Sequence[dict], path: str | Path, base_loss: float | None = None, tuned_loss: float | None = None) -> None:
    """Training loss (and learning rate) per step, the held-out loss measured during training, and
    the base and tuned eval losses as lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 3.6), dpi=80)
    FigureCanvasAgg(figure)  # Agg, no pyplot: no global state, no display needed
    axes = figure.add_subplot()
    points = [(r["step"], r["loss"]) for r in records if finite(r.get("loss"))]
    if points:
        axes.plot(*zip(*points), label="train loss", color="tab:blue")
    held_out = [(r["step"], r["eval_loss"]) for r in records if finite(r.get("eval_loss"))]
    if held_out:  # evaluation during training (train.eval_every)
        axes.plot(*zip(*held_out), label="held-out loss", color="tab:red", marker="o", markersize=3)
    for value, label, color in ((base_loss, "base eval loss", "tab:gray"), (tuned_loss, "tuned eval loss", "tab:green")):
        if finite(value):
            axes.axhline(value, linestyle="--", color=color, label=label)
    lrs = [(r["step"], r["lr"]) for r in records if finite(r.get("lr"))]
    if lrs:
        twin = axes.twinx()
        twin.plot(*zip(*lrs), color="tab:orange", alpha=0.5, linewidth=1)
        twin.set_ylabel("learning rate", color="tab:orange")
    if not points:
        axes.text(0.5, 0.5, "no training loss recorded", ha="center", va="center", transform=axes.transAxes)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title("Training loss")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    figure.savefig(str(path), format="png")
