"""Data at scale: JSON Lines files cut into row-range shards, each validated and tokenized as its own
cached unit; the merged dataset equal to one pass over all rows; shards on worker processes and on
a real Dask cluster giving the same store, byte for byte."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import datasets
import pytest

from schemas.config import DataOptions, TemplateOptions
from tasks import sharding
from tasks.core import shards, storage
from tasks.core.readers import Source
from tasks.core.rows import read_dataset
from tasks.tokenize import tokenize_dataset
from tasks.validate import DataValidationError, validate_data
from tests.conftest import ALPACA_ROWS

# 8 distinct rows, then the first 3 again: duplicates that land in later shards
ROWS = ALPACA_ROWS + ALPACA_ROWS[:3]


def write_jsonl(path: Path, rows: list, blank_after: int | None = None) -> str:
    lines = [json.dumps(row) for row in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")  # a blank line counts as a line, not a row
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_model(tiny_tokenizer_dir):
    from tests.test_tokenize import model_artifact

    return model_artifact(tiny_tokenizer_dir)


def prepare(urls: list[str], cache: Path, template: TemplateOptions | None = None, model=None, workers: int = 1, **options):
    data = validate_data(urls, [], DataOptions(**options), str(cache), workers=workers)
    tokenized = tokenize_dataset(data, model, template or TemplateOptions(max_length=96), str(cache), workers=workers) if model else None
    return data, tokenized


def report(data) -> dict:
    document = storage.read_json(data.report_uri)
    document.pop("key")  # the entry's key names its shards; everything else is the data's
    return document


def same_tree(left: str, right: str) -> None:
    """Every file of one entry equal, byte for byte, to the other's."""
    files = sorted(p.relative_to(left) for p in Path(left).rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(right) for p in Path(right).rglob("*") if p.is_file())
    for name in files:
        assert filecmp.cmp(Path(left, name), Path(right, name), shallow=False), name


# --- planning ----------------------------------------------------------------------------------


def test_a_jsonl_file_is_cut_every_shard_rows_rows_at_line_boundaries(tmp_path):
    url = write_jsonl(tmp_path / "a.jsonl", ROWS, blank_after=4)
    planned = shards.plan_shards([Source(url, "train")], {}, shard_rows=4)
    assert [(s.row_start, s.line_start) for s in planned] == [(0, 1), (4, 5), (8, 10)]  # line 5 is blank
    raw = Path(url).read_bytes()
    assert b"".join(raw[s.byte_start : s.byte_stop] for s in planned) == raw
    loaded = shards.read_shard(planned[1], {})
    assert loaded.rows == ROWS[4:8] and list(loaded.row_numbers) == [4, 5, 6, 7]
    assert [loaded.line(row) for row in loaded.row_numbers] == [6, 7, 8, 9]


def test_files_that_cannot_be_cut_are_one_shard(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps(ROWS))
    csv = tmp_path / "a.csv"
    csv.write_text("instruction,output\n" + "".join(f"q{i},a{i}\n" for i in range(9)))
    planned = shards.plan_shards([Source(str(array), "train"), Source(str(csv), "train")], {}, shard_rows=2)
    assert [spec.whole for spec in planned] == [True, True]


def test_a_bad_line_in_a_later_shard_is_named_by_its_file_line_and_row(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, ROWS)
    lines = path.read_text().splitlines()
    lines[9] = '{"instruction": "x", "output": '  # line 10, row 9, in the third shard
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError, match=r"a.jsonl: not valid JSON Lines: line 10"):
        validate_data([str(path)], [], DataOptions(shard_rows=4), str(tmp_path / "cache"))


def test_a_bad_row_in_a_later_shard_keeps_its_file_row_number(tmp_path):
    bad = dict(ALPACA_ROWS[0], output="")
    url = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS + [bad])
    data, _ = prepare([url], tmp_path / "cache", shard_rows=3, on_invalid="drop")
    assert [(row["row"], row["line"]) for row in storage.read_json(data.report_uri)["invalid_rows"]] == [(8, 9)]


# --- one pass or many shards: the same dataset --------------------------------------------------


def test_shards_give_the_report_rows_and_store_of_one_pass(tmp_path, tokenizer_model):
    url = write_jsonl(tmp_path / "a.jsonl", ROWS + [dict(ALPACA_ROWS[0], output="")], blank_after=6)
    options = {"on_invalid": "drop", "eval_fraction": 0.3}
    whole, whole_tokens = prepare([url], tmp_path / "one", model=tokenizer_model, **options)
    cut, cut_tokens = prepare([url], tmp_path / "many", model=tokenizer_model, shard_rows=3, **options)
    assert (whole.stats["shards"], cut.stats["shards"]) == ({"total": 1, "built": 1}, {"total": 4, "built": 4})
    assert report(cut) == report(whole) and cut.key == whole.key
    assert report(whole)["duplicates"] == 3 and report(whole)["rows_dropped"] == 1
    assert list(read_dataset(cut.uri)) == list(read_dataset(whole.uri))
    assert cut_tokens.key == whole_tokens.key
    assert {**cut_tokens.stats, "shards": None} == {**whole_tokens.stats, "shards": None}
    left, right = datasets.load_from_disk(whole_tokens.uri), datasets.load_from_disk(cut_tokens.uri)
    for split in ("train", "eval"):
        assert left[split].to_dict() == right[split].to_dict()


def test_duplicates_across_shards_are_dropped_on_request(tmp_path):
    url = write_jsonl(tmp_path / "a.jsonl", ROWS)
    data, _ = prepare([url], tmp_path / "cache", shard_rows=4, dedupe=True)
    rows = list(read_dataset(data.uri))
    assert len(rows) == len(ALPACA_ROWS) and data.stats["dropped_by_reason"] == {"duplicate": 3}
    assert storage.read_json(data.report_uri)["duplicate_rows"][0] == {"row": f"{url}:8", "same_as": f"{url}:0"}


# --- work proportional to what changed ---------------------------------------------------------


def test_appending_a_file_processes_only_that_file(tmp_path, tokenizer_model, monkeypatch):
    first = write_jsonl(tmp_path / "a.jsonl", ROWS)
    cache = tmp_path / "cache"
    prepare([first], cache, model=tokenizer_model, shard_rows=4)
    added = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "New?", "input": "", "output": "Yes, new."}])
    data, tokenized = prepare([first, added], cache, model=tokenizer_model, shard_rows=4)
    assert data.stats["shards"] == {"total": 4, "built": 1} and tokenized.stats["shards"] == {"total": 4, "built": 1}
    fresh_data, fresh = prepare([first, added], tmp_path / "fresh", model=tokenizer_model, shard_rows=4)
    assert (data.key, tokenized.key) == (fresh_data.key, fresh.key)
    same_tree(tokenized.uri, fresh.uri)


def test_a_template_change_tokenizes_every_shard_and_validates_none(tmp_path, tokenizer_model):
    url = write_jsonl(tmp_path / "a.jsonl", ROWS)
    cache = tmp_path / "cache"
    prepare([url], cache, model=tokenizer_model, shard_rows=4)
    data, tokenized = prepare([url], cache, TemplateOptions(max_length=96, train_on="last_assistant"), tokenizer_model, shard_rows=4)
    assert data.store_hit and data.stats["shards"] == {"total": 3, "built": 0}
    assert not tokenized.store_hit and tokenized.stats["shards"] == {"total": 3, "built": 3}


# --- where shards run ----------------------------------------------------------------------------


def test_worker_processes_build_the_same_store_byte_for_byte(tmp_path, tokenizer_model):
    url = write_jsonl(tmp_path / "a.jsonl", ROWS)
    _, here = prepare([url], tmp_path / "here", model=tokenizer_model, shard_rows=4)
    _, pooled = prepare([url], tmp_path / "pooled", model=tokenizer_model, shard_rows=4, workers=2)
    assert pooled.stats["shards"] == {"total": 3, "built": 3}
    same_tree(here.uri, pooled.uri)


def test_a_dask_cluster_needs_a_cache_that_its_workers_share():
    options = DataOptions(shard_rows=4, dask_address="tcp://127.0.0.1:1")
    with pytest.raises(sharding.SharedStorageError, match="memory://cache .*Dask workers cannot reach it"):
        sharding.prefect_runner(None, options, "memory://cache")(None, [1, 2], [False, False], sharding.Work(0))


@pytest.fixture(scope="module")
def dask_cluster():
    """A real Dask cluster: a scheduler and 2 worker processes on loopback ports."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        yield cluster


def test_the_flow_stages_on_worker_processes_and_on_dask_give_the_same_store(prefect_harness, dask_cluster, tmp_path, tokenizer_model):
    """validate-data and tokenize-and-cache as the flow runs them (Prefect tasks, shards mapped as
    task runs): in this process, on Prefect's process pool and on a Dask cluster, byte for byte."""
    from prefect import flow

    from tasks.tokenize import tokenize_task
    from tasks.validate import validate_task

    url = write_jsonl(tmp_path / "a.jsonl", ROWS)

    @flow
    def prepare_data(cache: str, options: DataOptions) -> tuple:
        data = validate_task([url], [], options, cache)
        return data, tokenize_task(data, tokenizer_model, TemplateOptions(max_length=96), cache, None, options)

    stores = {}
    for name, extra in (("here", {"workers": 1}), ("processes", {"workers": 2}), ("dask", {"dask_address": dask_cluster.scheduler_address})):
        data, tokenized = prepare_data(str(tmp_path / name), DataOptions(shard_rows=4, **extra))
        assert data.stats["shards"] == {"total": 3, "built": 3} and tokenized.stats["shards"] == {"total": 3, "built": 3}
        stores[name] = tokenized.uri
    same_tree(stores["here"], stores["processes"])
    same_tree(stores["here"], stores["dask"])
