"""Prefect cache keys from the stages' content keys: a record is trusted only while its entry is
complete. (An input changing mid-run, InputsChangedError, is tests/test_validate.py's Prefect test.)"""

from __future__ import annotations

from types import SimpleNamespace

from tasks import caching
from tasks.caching import content_cache_key, ensure_record_matches, record_key
from tasks.core import storage

KEY = "f" * 64


def context(records: set[str]) -> SimpleNamespace:
    """A stand-in for Prefect's task run context: the task's name and its result store."""
    return SimpleNamespace(task=SimpleNamespace(name="stage"), result_store=SimpleNamespace(exists=lambda key: key in records))


def entry_at(url: str):
    def stage_entry(data: str, cache_dir: str) -> tuple[str, str]:
        return KEY, url

    return stage_entry


def complete(folder) -> str:
    folder.mkdir(parents=True)
    (folder / storage.COMPLETE_MARKER).write_text("ok\n")
    return str(folder)


def test_record_key_names_the_stage_the_key_and_the_entry_url():
    key = record_key("stage", KEY, "/cache/a")
    assert key.startswith(f"stage-{KEY[:32]}-")
    assert record_key("stage", KEY, "/other-cache/a") != key  # two cache dirs never share a record


def test_complete_entry_gets_its_record_key(tmp_path):
    url = complete(tmp_path / "entry")
    cache_key = content_cache_key(entry_at(url))
    expected = record_key("stage", KEY, url)
    assert cache_key(context({expected}), {"data": "d", "cache_dir": "c"}) == expected


def test_a_record_for_a_missing_entry_is_not_trusted(tmp_path):
    url = str(tmp_path / "gone")
    cache_key = content_cache_key(entry_at(url))
    parameters = {"data": "d", "cache_dir": "c"}
    assert cache_key(context({record_key("stage", KEY, url)}), parameters) is None  # run the stage instead
    assert cache_key(context(set()), parameters) == record_key("stage", KEY, url)  # first run: no record yet


def test_only_the_parameters_the_entry_takes_reach_it_and_storage_options_reach_the_check(tmp_path, monkeypatch):
    url = complete(tmp_path / "entry")
    checked = []
    monkeypatch.setattr(caching.storage, "is_complete", lambda where, options=None: checked.append(options) or True)
    cache_key = content_cache_key(entry_at(url), storage_options_param="storage")
    parameters = {"data": "d", "cache_dir": "c", "options": object(), "storage": {"anon": True}}
    assert cache_key(context(set()), parameters) == record_key("stage", KEY, url)
    assert checked == [{"anon": True}]


def test_ensure_record_matches_outside_a_task_run_does_nothing():
    assert ensure_record_matches(KEY, "/cache/a") is None
