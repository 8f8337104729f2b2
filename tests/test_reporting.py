"""reporting: the one number format, data text escaped in markdown, the metric table, the loss plot
and the evaluation report. Pure functions on small values; no model."""

from __future__ import annotations

import json
import re

import pytest

from schemas.manifests import TrainArtifact
from tasks import reporting

PNG = b"\x89PNG\r\n\x1a\n"
BASE = {"eval_loss": 2.0, "perplexity": 7.38905609893065, "token_f1": 0.25, "eval_tokens": 40, "eval_examples": 4, "num_generated": 2}
TUNED = {"eval_loss": 1.5, "perplexity": 4.4816890703380645, "token_f1": float("nan"), "eval_tokens": 40, "eval_examples": 4, "num_generated": 2}


def gfm_cells(row: str) -> list[str]:
    """The cells of a GitHub-flavoured markdown table row, split as GFM does: at every pipe that
    no backslash escapes (a backslash escapes the character after it, including a backslash)."""
    return re.findall(r"((?:\\.|[^|\\])*)\|", row.strip()[1:])


@pytest.mark.parametrize(
    "value, shown",
    [(None, "-"), (0.123456, "0.1235"), (2.0, "2.0000"), (float("nan"), "nan"), (float("inf"), "inf"), (3, "3"), (True, "True"), ("x", "x")],
)
def test_one_number_format(value, shown):
    assert reporting.number(value) == shown


@pytest.mark.parametrize(
    "text, cell",
    [
        ("a | b", "a \\| b"),
        ("ends in a backslash \\", "ends in a backslash \\\\"),
        ("a\\|b", "a\\\\\\|b"),  # before: `a\\|b`, whose pipe then ended the cell
        ("line one\nline two\r\nthree", "line one<br>line two<br>three"),
        ("<!-- hides the rest", "\\<!-- hides the rest"),
        ("**bold** `code` [link](x) ~~gone~~ & <b>", "\\*\\*bold\\*\\* \\`code\\` \\[link\\](x) \\~\\~gone\\~\\~ \\& \\<b\\>"),
        ("snake_case", "snake\\_case"),
    ],
)
def test_data_text_in_a_table_cell_is_shown_literally(text, cell):
    assert reporting.cell(text) == cell
    assert gfm_cells(f"| {reporting.cell(text)} | next |") == [f" {cell} ", " next "]


def test_numbers_in_cells_use_the_number_format():
    assert [reporting.cell(v) for v in (None, 0.5, 7)] == ["-", "0.5000", "7"]


@pytest.mark.parametrize("text, span", [("a.jsonl", "`a.jsonl`"), ("we`ird", "``we`ird``"), ("`x`", "`` `x` ``"), ("two\nlines", "`two lines`")])
def test_code_spans_hold_any_text(text, span):
    assert reporting.code(text) == span


def test_metric_rows_cover_reported_metrics_with_non_finite_values_as_none():
    assert reporting.metric_rows(BASE, TUNED) == [
        {"metric": "eval_loss", "base": 2.0, "tuned": 1.5, "delta": -0.5},
        {"metric": "perplexity", "base": 7.389056, "tuned": 4.481689, "delta": -2.907367},
        {"metric": "token_f1", "base": 0.25, "tuned": None, "delta": None},
    ]


def test_metric_table_is_markdown_and_empty_when_nothing_was_measured():
    assert reporting.metric_table(BASE, TUNED) == [
        "| metric | base | tuned | delta |",
        "|---|---|---|---|",
        "| eval_loss | 2.0000 | 1.5000 | -0.5000 |",
        "| perplexity | 7.3891 | 4.4817 | -2.9074 |",
        "| token_f1 | 0.2500 | - | - |",
    ]
    assert reporting.metric_table({}, {}) == []


def test_the_report_escapes_data_text_so_every_generation_row_keeps_its_four_cells():
    generations = [{"prompt": "Pipes | and\nnewlines", "reference": "a\\|b", "base": "<!-- comment", "tuned": "*fine*"}]
    report = reporting.render_report(BASE, TUNED, generations, True, "passed gate on eval_loss", "loss_curve.png")
    lines = report.splitlines()
    assert lines[2] == "**Quality gate: PASSED** - passed gate on eval_loss"
    assert "| eval_loss | 2.0000 | 1.5000 | -0.5000 |" in lines
    assert "Eval rows: 4 (40 response tokens); generated answers: 2 (greedy). eval_loss and perplexity: lower is better." in lines
    assert "![loss curve](loss_curve.png)" in lines
    row = lines[-1]
    assert gfm_cells(row) == [" Pipes \\| and<br>newlines ", " a\\\\\\|b ", " \\<!-- comment ", " \\*fine\\* "]


def test_a_report_without_scores_or_generations_has_no_tables():
    report = reporting.render_report({}, {}, [], True, "evaluation disabled", "x.png")
    assert "| metric |" not in report and "## Sample generations" not in report and "![loss curve](x.png)" in report


def test_loss_curve_records_are_read_and_plotted(tmp_path):
    records = [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": None, "lr": 5e-4}, {"note": "not a step"}]
    (tmp_path / "curve.json").write_text(json.dumps(records))
    trained = TrainArtifact(stage="train", uri=str(tmp_path), key="k", method="lora", loss_curve_uri=str(tmp_path / "curve.json"))
    assert reporting.read_loss_curve(trained) == records[:2]
    reporting.plot_loss_curve(records[:2], tmp_path / "curve.png", base_loss=3.0, tuned_loss=2.0)
    assert (tmp_path / "curve.png").read_bytes()[:8] == PNG


def test_a_missing_loss_curve_reads_as_none_and_plots_a_placeholder(tmp_path):
    trained = TrainArtifact(stage="train", uri=str(tmp_path), key="k", method="full", loss_curve_uri=str(tmp_path / "none.json"))
    assert reporting.read_loss_curve(trained) == []
    reporting.plot_loss_curve([], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG
