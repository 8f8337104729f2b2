"""flows/report: the terminal summaries a CLI user reads at the end of a run."""

from __future__ import annotations

import json

from flows.report import format_comparison, format_dataset_stats, format_run_summary

VALIDATION = {"rows_read": 10, "rows_kept": 9, "dropped_by_reason": {"null": 1}}
TOKENIZATION = {"train": {"kept": 7, "tokens": 1234, "loss_fraction": 0.4567891}, "eval": {"kept": 2}}


def test_dataset_stats_flatten_nested_counts_into_aligned_rows():
    text = format_dataset_stats(VALIDATION, TOKENIZATION)
    lines = text.splitlines()
    assert lines[0] == "Validation" and "Tokenization" in lines
    assert any(line.split() == ["dropped_by_reason.null", "|", "1"] for line in lines)
    assert any(line.split() == ["train.loss_fraction", "|", "0.4568"] for line in lines)  # one number format
    table = lines[2:7]
    assert len({line.index("|") for line in table if "|" in line}) == 1  # the columns line up


def write_eval(folder, prompt: str) -> str:
    folder.mkdir()
    base = {"eval_loss": 2.5, "token_f1": 0.1, "eval_examples": 4, "eval_tokens": 40, "num_generated": 1}
    tuned = {"eval_loss": 1.25, "token_f1": 0.5}
    (folder / "metrics.json").write_text(json.dumps({"base": base, "tuned": tuned}))
    (folder / "generations.json").write_text(json.dumps([{"prompt": prompt, "base": "no idea", "tuned": "Paris"}]))
    return str(folder)


def test_comparison_shows_metrics_with_deltas_and_answers_on_one_line_each(tmp_path):
    text = format_comparison(write_eval(tmp_path / "eval", "What is\nthe capital   of France? " + "really " * 40))
    lines = text.splitlines()
    assert any(line.split() == ["eval_loss", "|", "2.5000", "|", "1.2500", "|", "-1.2500"] for line in lines)
    assert "eval rows: 4 (40 response tokens); generated answers: 1 (greedy)" in lines
    question = next(line for line in lines if line.startswith("Q: "))
    assert question.startswith("Q: What is the capital of France? really") and question.endswith(" ...")
    assert len(question) <= len("Q: ") + 120
    assert "  tuned: Paris" in lines


def test_run_summary_lists_every_stage_and_adds_the_dry_run_statistics():
    stages = {
        "validate-data": {"cache": "miss", "wall_s": 0.2, "uri": "cache/validated/k/data.jsonl", "stats": VALIDATION},
        "tokenize-and-cache": {"cache": "hit", "wall_s": 0.01, "uri": "cache/tokenized/k", "stats": TOKENIZATION},
    }
    manifest = {"status": "dry-run", "manifest_uri": "out/attempts/x/run_manifest.json", "stages": stages}
    text = format_run_summary(manifest, 3.21)
    assert text.startswith("Run dry-run in 3.2 s. Manifest: out/attempts/x/run_manifest.json")
    assert any(line.split()[:3] == ["tokenize-and-cache", "|", "hit"] for line in text.splitlines())
    assert "train.tokens" in text and "Base vs tuned" not in text
