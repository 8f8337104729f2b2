"""The training benchmark's arithmetic: what counts as steady state, and the merged table of rows
measured in separate processes (benchmarks/device_check.sh runs one process a row)."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_train


def marks(step_seconds: list[float], tokens: int = 100, graphs: list[int] | None = None):
    """(end time, tokens so far, label tokens so far, graphs so far) of steps of these durations."""
    clock, rows = 0.0, []
    for k, seconds in enumerate(step_seconds, 1):
        clock += seconds
        rows.append((clock, k * tokens, k * tokens // 2, (graphs or [0] * len(step_seconds))[k - 1]))
    return rows


def test_warm_up_steps_stay_out_of_the_steady_rate_for_every_tool():
    """Compiling (step 1) and recompiling at the second length (step 2) do not count as steady
    state: 3 warm-up steps leave 7 steps of 0.1 s at 100 tokens each, 1,000 tokens/s."""
    row = bench_train.summarise("x", marks([20.0, 5.0, 0.1] + [0.1] * 7, graphs=[4, 6, 6, 6, 6, 6, 6, 6, 7, 7]), 0.0, 1.0, None, 3)
    assert row["tokens_per_s"] == pytest.approx(1000.0)
    assert row["first_step_s"] == pytest.approx(20.0)
    assert (row["graphs"], row["graphs_after_warmup"]) == (7, 1)
    # 200 steps from launch: the 25.1 s of warm-up as measured, then 197 steps at 0.1 s.
    assert row["launch_200_tokens_per_s"] == pytest.approx(200 * 100 / (25.1 + 197 * 0.1))


def test_a_run_shorter_than_its_warm_up_keeps_one_steady_step():
    row = bench_train.summarise("x", marks([2.0, 0.5]), 0.0, None, None, 3)
    assert row["warmup_steps"] == 1 and row["tokens_per_s"] == pytest.approx(200.0)


def test_rows_from_separate_processes_make_one_table(tmp_path):
    base = {"label_tokens_per_s": 1.0, "tokens_per_step": 8192, "peak_gib": 2.0, "first_step_s": 1.0, "final_loss": 1.0,
            "graphs": 0, "graphs_after_warmup": 0, "params": 1e6, "peak_flops": None}
    lines = [{**base, "name": "ours (flex)", "tokens_per_s": 300.0, "launch_200_tokens_per_s": 200.0, "notes": ["a", "b"]},
             {**base, "name": "TRL best", "tokens_per_s": 100.0, "launch_200_tokens_per_s": 100.0, "notes": ["b", "c"]}]
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = bench_train.markdown(*bench_train.read_rows(out))
    assert "| TRL best | 100 |" in table and "| 3.00x | 2.00x |" in table
    assert table.count("- b") == 1 and table.endswith("- c")
