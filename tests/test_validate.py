"""validate-data: every format onto the canonical rows, every bad row named, the entry keyed by the
bytes it parsed. Reading files is tests/test_readers.py; splits and duplicates tests/test_rows.py."""

from __future__ import annotations

import json
import logging

import fsspec
import pytest

from schemas.config import DataOptions
from tasks.core import storage
from tasks.core.rows import read_dataset
from tasks.validate import (
    DataValidationError,
    report_table,
    validate_data,
    validate_entry,
    validate_task,
)
from tests.conftest import ALPACA_ROWS
from tests.test_readers import CHAT_ROW, GOOD, encode, mem, put  # noqa: F401 - mem is a fixture

EXPECTED_FIRST = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


@pytest.fixture()
def cache(tmp_path):
    return str(tmp_path / "cache")


def run(urls: list[str], cache: str, eval_urls: list[str] = (), **options):
    artifact = validate_data(list(urls), list(eval_urls), DataOptions(**options), cache)
    rows = list(read_dataset(artifact.uri))
    return artifact, rows


def fails(urls: list[str], cache: str, **options) -> str:
    with pytest.raises(DataValidationError) as caught:
        validate_data(list(urls), [], DataOptions(**options), cache)
    return str(caught.value)


# --- formats -----------------------------------------------------------------------------------


def test_alpaca_input_is_joined_and_system_comes_first(mem, cache):
    rows = [
        {"instruction": "Translate.", "input": "hello", "output": "Bonjour.", "system": "You translate."},
        {"instruction": "Say hi.", "input": "  ", "output": "Hi!"},
    ]
    _, out = run([put(f"{mem}/a.json", rows)], cache, eval_fraction=0.0)
    assert out[0]["messages"] == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Translate.\n\nhello"},
        {"role": "assistant", "content": "Bonjour."},
    ]
    assert out[1]["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert [row["source"] for row in out] == [f"{mem}/a.json:0", f"{mem}/a.json:1"]


def test_alpaca_without_input_column(mem, cache):
    rows = [{"instruction": "Say hi.", "output": "Hi!"}]
    _, out = run([put(f"{mem}/a.jsonl", rows, "jsonl")], cache)
    assert out[0]["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]


def test_prompt_completion(mem, cache):
    _, out = run([put(f"{mem}/p.jsonl", [{"prompt": "2+2?", "completion": "4"}], "jsonl")], cache)
    assert out[0]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_chat_multi_turn(mem, cache):
    _, out = run([put(f"{mem}/c.jsonl", [CHAT_ROW], "jsonl")], cache)
    assert out[0]["messages"] == CHAT_ROW["messages"]


def test_sharegpt_roles_are_mapped(mem, cache):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    _, out = run([put(f"{mem}/s.json", [row])], cache)
    assert out[0]["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]


def test_column_mapping_renames_user_columns(mem, cache):
    rows = [{"question": "Q?", "answer": "A."}]
    url = put(f"{mem}/q.jsonl", rows, "jsonl")
    assert "cannot tell the format" in fails([url], cache)
    _, out = run([url], cache, column_mapping={"question": "instruction", "answer": "output"})
    assert out[0]["messages"] == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_named_format_matches_auto_and_is_enforced(mem, cache):
    url = put(f"{mem}/a.json", ALPACA_ROWS)
    auto, _ = run([url], cache)
    named, _ = run([url], cache, format="alpaca")
    assert named.key == auto.key
    message = fails([url], cache, format="prompt_completion")
    assert "missing column(s) 'prompt', 'completion'" in message and "a.json" in message


# --- sources -----------------------------------------------------------------------------------


def test_local_path_and_file_url(tmp_path, cache):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(encode(ALPACA_ROWS, "jsonl"))
    by_path, _ = run([str(path)], cache)
    by_url, _ = run([f"file://{path}"], cache)
    assert by_path.key == by_url.key and by_path.stats["rows_kept"] == len(ALPACA_ROWS)


# --- bad rows and bad files --------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_row, column, reason",
    [
        ({"instruction": 5, "output": "A."}, "instruction", "expected a string, got int 5"),
        ({"instruction": {"a": 1}, "output": "A."}, "instruction", "expected a string, got dict"),
        ({"instruction": "Q?", "output": None}, "output", "missing value (null)"),
        ({"instruction": " \n\t", "output": "A."}, "instruction", "empty or whitespace-only"),
        ({"instruction": "Q?", "output": "A." * 30}, "instruction+output", "more than max_chars=50"),
        ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages", "messages[0].role: 'bot' is not one of"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages", "no assistant turn"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]}, "messages", "messages[1].content: expected a string"),
        ({"messages": "hello"}, "messages", "expected a non-empty list"),
    ],
)
def test_bad_row_is_named_by_file_row_line_and_column(mem, cache, bad_row, column, reason):
    good = CHAT_ROW if "messages" in bad_row else GOOD
    url = put(f"{mem}/bad.jsonl", [good, good, bad_row], "jsonl")
    message = fails([url], cache, max_chars=50)
    assert f"{url} row 2 (0-based), line 3, column '{column}': " in message
    assert reason in message


def test_missing_column_names_file_and_column(mem, cache):
    message = fails([put(f"{mem}/m.json", [{"instruction": "Q?"}])], cache)
    assert message.startswith(f"{mem}/m.json: missing column(s) 'output'")


def test_fail_lists_twenty_rows_and_reports_them_all(mem, cache):
    rows = [GOOD] + [{"instruction": index, "output": "A."} for index in range(25)]
    message = fails([put(f"{mem}/many.jsonl", rows, "jsonl")], cache)
    listed = [line for line in message.splitlines() if "(0-based)" in line]
    assert len(listed) == 20 and "... and 5 more" in message
    report_url = message.splitlines()[0].rsplit("full list: ", 1)[1]
    assert report_url.startswith(f"{cache}/validation-reports/")
    assert len(storage.read_json(report_url)["invalid_rows"]) == 25


def test_a_cache_behind_credentials_gets_the_entry_and_the_failure_report_with_them(mem, locked_cache):
    from tests.conftest import LockedMemoryFileSystem

    cache_dir, cache_options = locked_cache
    url = put(f"{mem}/a.jsonl", ALPACA_ROWS, "jsonl")
    first = validate_data([url], [], DataOptions(), cache_dir, cache_options)
    assert first.uri.startswith(f"{cache_dir}/validated/") and not first.store_hit
    assert validate_data([url], [], DataOptions(), cache_dir, cache_options).store_hit
    assert storage.read_json(first.report_uri, cache_options)["rows_kept"] == len(ALPACA_ROWS)
    bad = put(f"{mem}/bad.jsonl", [GOOD, {"instruction": 3, "output": "A."}], "jsonl")
    with pytest.raises(DataValidationError) as raised:
        validate_data([bad], [], DataOptions(), cache_dir, cache_options)
    report_url = str(raised.value).splitlines()[0].rsplit("full list: ", 1)[1]
    assert report_url.startswith(f"{cache_dir}/validation-reports/")
    assert storage.read_json(report_url, cache_options)["status"] == "failed"
    assert LockedMemoryFileSystem.refused == []


def test_drop_removes_counts_and_reports_bad_rows(mem, cache):
    rows = [GOOD, {"instruction": 1, "output": "A."}, {"instruction": "", "output": "A."}, {"instruction": "Q", "output": None}, 7]
    artifact, out = run([put(f"{mem}/d.json", rows)], cache, on_invalid="drop")
    assert artifact.stats["rows_read"] == 5 and artifact.stats["rows_kept"] == len(out) == 1
    assert artifact.stats["dropped_by_reason"] == {"not_a_string": 1, "empty": 1, "null": 1, "not_an_object": 1}
    report = storage.read_json(artifact.report_uri)
    assert [(failure["row"], failure["column"]) for failure in report["invalid_rows"]] == [
        (1, "instruction"), (2, "instruction"), (3, "output"), (4, "(row)"),
    ]


def test_every_unreadable_file_is_named_in_one_error(mem, cache):
    """Each file the readers refuse is one line, prefixed with its name; the good file passes."""
    good = put(f"{mem}/good.jsonl", [GOOD], "jsonl")
    empty, broken = put(f"{mem}/empty.jsonl", ""), put(f"{mem}/broken.json", '[{"instruction": "Q?",')
    lines = fails([good, empty, broken], cache).splitlines()
    assert len(lines) == 2 and lines[0] == f"{empty}: the file is empty"
    assert lines[1].startswith(f"{broken}: not valid JSON")


# --- duplicates, split, keys -------------------------------------------------------------------


def test_duplicates_are_reported_and_dropped_on_request(mem, cache):
    url = put(f"{mem}/dup.jsonl", ALPACA_ROWS + ALPACA_ROWS[:2], "jsonl")
    kept, _ = run([url], cache)
    assert kept.stats["duplicates"] == 2 and kept.stats["rows_kept"] == len(ALPACA_ROWS) + 2
    deduped, out = run([url], cache, dedupe=True)
    assert deduped.stats["rows_kept"] == len(out) == len(ALPACA_ROWS)
    assert deduped.stats["dropped_by_reason"] == {"duplicate": 2}
    report = storage.read_json(deduped.report_uri)
    assert report["duplicate_rows"][0] == {"row": f"{url}:8", "same_as": f"{url}:0"}


def test_eval_files_are_the_eval_split(mem, cache):
    train = put(f"{mem}/train.jsonl", ALPACA_ROWS, "jsonl")
    held = put(f"{mem}/eval.jsonl", [GOOD], "jsonl")
    artifact, out = run([train], cache, eval_urls=[held], eval_fraction=0.5)
    assert [row["split"] for row in out] == ["train"] * len(ALPACA_ROWS) + ["eval"]


def test_key_follows_bytes_not_file_names(mem, cache):
    options = DataOptions()
    content = encode(ALPACA_ROWS, "jsonl")
    key, url = validate_entry([put(f"{mem}/one.jsonl", content)], [], options, cache)
    renamed, _ = validate_entry([put(f"{mem}/two.jsonl", content)], [], options, cache)
    changed, _ = validate_entry([put(f"{mem}/three.jsonl", content.replace(b"Paris", b"Parix"))], [], options, cache)
    assert renamed == key != changed
    assert url == f"{cache}/validated/{key}"
    assert validate_entry([f"{mem}/one.jsonl"], [], DataOptions(dedupe=True), cache)[0] != key


def test_entry_is_reused_and_artifact_key_is_the_content_hash(mem, cache, tmp_path):
    url = put(f"{mem}/a.jsonl", ALPACA_ROWS, "jsonl")
    first, _ = run([url], cache)
    second, _ = run([url], cache)
    assert not first.store_hit and second.store_hit
    assert (first.stats.pop("shards"), second.stats.pop("shards")) == ({"total": 1, "built": 1}, {"total": 1, "built": 0})
    assert second.key == first.key and second.stats == first.stats
    # The downstream key ignores the `source` labels: the same rows under another file name
    # (a rebuilt entry, new cache dir) give the same key, so tokenization is not redone.
    renamed, _ = run([put(f"{mem}/renamed.jsonl", ALPACA_ROWS, "jsonl")], str(tmp_path / "other-cache"))
    assert renamed.key == first.key and renamed.uri != first.uri
    report = storage.read_json(first.report_uri)
    assert {"rows_read", "rows_kept", "dropped_by_reason", "duplicates", "chars", "files"} <= set(report)


def test_each_file_is_read_twice_and_keyed_by_the_bytes_that_were_parsed(mem, cache, monkeypatch):
    """A file rewritten between Prefect's cache-key hash and the stage's read is stored under the
    key of what was parsed, never under the old content's key. The stage reads a file once to cut
    and hash its shards and once to parse them (checked against those hashes)."""
    url = put(f"{mem}/a.jsonl.gz", ALPACA_ROWS, "jsonl.gz")
    old_key, _ = validate_entry([url], [], DataOptions(), cache)  # what Prefect's key function saw
    put(url, ALPACA_ROWS[:2], "jsonl.gz")  # the file changes before the stage reads it
    opened, real_open = [], fsspec.open
    monkeypatch.setattr(fsspec, "open", lambda target, *a, **k: opened.append(target) or real_open(target, *a, **k))
    artifact, rows = run([url], cache)
    assert opened.count(url) == 2
    new_key, _ = validate_entry([url], [], DataOptions(), cache)
    assert len(rows) == 2 and new_key != old_key and f"/validated/{new_key}/" in artifact.uri


def test_a_shard_that_changes_after_it_was_planned_is_refused(mem, cache, monkeypatch):
    """Planning hashed the bytes; the shard's read hashes them again and refuses others."""
    import tasks.core.shards as shards

    url = put(f"{mem}/a.jsonl", ALPACA_ROWS, "jsonl")
    real_read = shards.read_shard

    def rewritten_first(spec, options):
        put(url, ALPACA_ROWS[::-1], "jsonl")
        return real_read(spec, options)

    monkeypatch.setattr(shards, "read_shard", rewritten_first)
    with pytest.raises(shards.ShardChangedError, match="changed while it was read"):
        run([url], cache)


# --- Prefect wrapper ---------------------------------------------------------------------------


def test_a_file_changed_after_prefect_hashed_it_is_never_recorded_under_the_old_key(prefect_harness, tmp_path, monkeypatch):
    """The file changes between Prefect's cache key and the stage's read: that attempt fails
    instead of filing the new rows under the old bytes' key; the retry hashes again. Later runs
    on the old bytes get the old rows, however often they run."""
    from prefect import flow

    import tasks.core.shards as shards

    data, cache = tmp_path / "data.jsonl", str(tmp_path / "cache")
    put(str(data), ALPACA_ROWS, "jsonl")
    reads, real_read = [], shards.read_shard

    def rewritten_before_the_first_read(spec, options):
        if not reads:
            put(str(data), ALPACA_ROWS[:2], "jsonl")
        reads.append(spec.source.url)
        return real_read(spec, options)

    task = validate_task.with_options(result_storage=tmp_path / "results", retry_delay_seconds=0)

    @flow
    def validate_once() -> int:
        return task([str(data)], [], DataOptions(), cache).stats["rows_kept"]

    monkeypatch.setattr(shards, "read_shard", rewritten_before_the_first_read)
    assert validate_once() == 2 and len(reads) == 2  # the first attempt refused, the retry planned again
    monkeypatch.setattr(shards, "read_shard", real_read)
    put(str(data), ALPACA_ROWS, "jsonl")  # back to the first bytes
    assert [validate_once() for _ in range(2)] == [len(ALPACA_ROWS)] * 2


def test_task_wrapper_runs_outside_a_flow(mem, cache):
    artifact = validate_task.fn([put(f"{mem}/a.json", ALPACA_ROWS)], [], DataOptions(), cache)
    assert artifact.stage == "validate-data" and artifact.stats["rows_kept"] == len(ALPACA_ROWS)
    assert {"measure": "chars.min", "value": artifact.stats["chars"]["min"]} in report_table(artifact.stats)


def test_bad_data_is_not_retried():
    from prefect.states import Failed

    from tasks.retrying import retry_transient

    assert validate_task.retry_condition_fn is retry_transient
    assert not retry_transient(None, None, Failed(data=DataValidationError("bad")))
    assert retry_transient(None, None, Failed(data=ConnectionError("flaky")))


def test_float_nan_in_an_optional_text_column_is_not_a_missing_value(mem, cache):
    """Parquet can hold a float NaN where text belongs; only a missing value (null) may pass."""
    url = put(f"{mem}/nan.parquet", [{"instruction": "Q?", "input": float("nan"), "output": "A."}], "parquet")
    assert f"{url} row 0 (0-based), column 'input': expected a string, got float nan" in fails([url], cache)
    # A key absent from some JSON rows is still a missing value, and so is a Parquet null.
    rows = [{"instruction": "Q?", "input": "x", "output": "A."}, {"instruction": "R?", "output": "B."}]
    _, out = run([put(f"{mem}/some.jsonl", rows, "jsonl"), put(f"{mem}/null.parquet", [{**GOOD, "input": None}], "parquet")], cache)
    assert [row["messages"][0]["content"] for row in out] == ["Q?\n\nx", "R?", "Q?"]


def test_eval_rows_that_are_training_rows_are_counted_and_named(mem, cache, caplog):
    train = put(f"{mem}/train.jsonl", ALPACA_ROWS, "jsonl")
    held = put(f"{mem}/eval.jsonl", ALPACA_ROWS[:2] + [GOOD], "jsonl")
    with caplog.at_level(logging.WARNING, logger="tasks.validate"):
        artifact, _ = run([train], cache, eval_urls=[held])
    assert artifact.stats["eval_rows_in_train"] == 2
    assert "2 of 3 eval row(s)" in caplog.text and held in caplog.text
    same, _ = run([train], cache, eval_urls=[train])  # --eval_data equal to --data
    assert same.stats["eval_rows_in_train"] == same.stats["eval_rows"] == len(ALPACA_ROWS)
    split, _ = run([train], cache, eval_fraction=0.3)  # a hash split never shares a row
    assert split.stats["eval_rows_in_train"] == 0 < split.stats["eval_rows"]
