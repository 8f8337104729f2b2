"""tokenize-and-cache: the Arrow entry, its statistics, and a cache keyed by content."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pytest
from prefect.states import Failed

from schemas.config import TemplateOptions
from schemas.manifests import DataArtifact, ModelArtifact
from tasks import tokenize as stage
from tasks.caching import content_cache_key
from tasks.core import storage
from tasks.core.collate import IGNORE_INDEX
from tasks.core.formatting import TemplateError
from tasks.core.hashing import hash_url
from tasks.core.rows import read_canonical
from tasks.model import tokenizer_fingerprint
from tasks.validate import DataValidationError
from tests.conftest import ALPACA_ROWS
from tests.tiny import build_tokenizer


def canonical_rows() -> list[dict]:
    rows = []
    for i, row in enumerate(ALPACA_ROWS):
        messages = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
        rows.append({"messages": messages, "split": "eval" if i % 4 == 3 else "train", "source": f"alpaca.json:{i}"})
    rows.append({"messages": [{"role": "user", "content": "Say hello. " * 40},
                              {"role": "assistant", "content": "Hello!"}], "split": "train", "source": "alpaca.json:8"})
    rows.append({"messages": [{"role": "user", "content": "No answer here."}], "split": "train",
                 "source": "alpaca.json:9"})
    return rows


def write_data(path: Path, rows: list[dict]) -> DataArtifact:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return DataArtifact(stage="validate-data", uri=str(path), key=hash_url(str(path)), report_uri="", stats={})


def model_artifact(folder: Path) -> ModelArtifact:
    return ModelArtifact(stage="import-model", uri=str(folder), key="tiny", source=str(folder),
                         tokenizer_hash=tokenizer_fingerprint(folder))


@pytest.fixture()
def setup(tmp_path, tiny_tokenizer_dir):
    data = write_data(tmp_path / "valid.jsonl", canonical_rows())
    return SimpleNamespace(data=data, model=model_artifact(tiny_tokenizer_dir), options=TemplateOptions(max_length=96),
                           cache=str(tmp_path / "cache"), tmp=tmp_path)


def test_writes_arrow_splits_and_statistics(setup):
    result = stage.tokenize_dataset(setup.data, setup.model, setup.options, setup.cache)
    assert not result.store_hit and result.stage == "tokenize-and-cache"
    assert storage.is_complete(result.uri) and result.uri.endswith(result.key)
    loaded = datasets.load_from_disk(result.uri)
    assert set(loaded) == {"train", "eval"}
    train, evaluation = result.stats["train"], result.stats["eval"]
    assert (train["rows"], train["kept"], train["dropped"]) == (8, 6, {"too_long": 1, "no_loss_tokens": 1})
    assert (evaluation["rows"], evaluation["kept"], evaluation["truncated"]) == (2, 2, 0)
    assert loaded["train"].num_rows == 6 and loaded["eval"].num_rows == 2
    for row in loaded["train"]:
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"] <= 96
        assert row["labels"][-2] == row["input_ids"][-2]  # <|im_end|> carries loss, the newline does not
        assert row["labels"][-1] == IGNORE_INDEX
    tokens = sum(loaded["train"]["length"])
    loss = sum(sum(label != IGNORE_INDEX for label in row) for row in loaded["train"]["labels"])
    assert (train["tokens"], train["loss_tokens"]) == (tokens, loss)
    assert train["loss_fraction"] == round(loss / tokens, 4)
    assert train["max_length"] == max(loaded["train"]["length"]) and result.stats["template"] == "model"
    assert result.stats["shards"] == {"total": 1, "built": 1}
    assert json.loads(Path(result.uri, "stats.json").read_text()) == {**result.stats, "shards": {"total": 1}}


def test_truncate_response_counts_truncated_rows(setup):
    options = TemplateOptions(max_length=96, truncation="truncate_response")
    result = stage.tokenize_dataset(setup.data, setup.model, options, setup.cache)
    assert result.stats["train"]["truncated"] == 0  # the long row's prompt alone does not fit
    assert result.stats["train"]["dropped"] == {"too_long": 0, "no_loss_tokens": 2}


def _files(folder: str) -> dict[Path, tuple[int, int]]:
    return {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in Path(folder).rglob("*")}


def test_cache_hit_reads_no_rows_tokenizes_nothing_and_rewrites_nothing(setup, monkeypatch):
    first = stage.tokenize_dataset(setup.data, setup.model, setup.options, setup.cache)
    written = _files(first.uri)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cache hit must not read the rows, load the tokenizer or tokenize")

    for module, name in ((stage, "read_canonical"), (stage.formatting, "load_tokenizer"), (stage.formatting, "encode_batch")):
        monkeypatch.setattr(module, name, must_not_run)
    second = stage.tokenize_dataset(setup.data, setup.model, setup.options, setup.cache)
    assert (first.stats["shards"].pop("built"), second.stats["shards"].pop("built")) == (1, 0)
    assert second.store_hit and (second.key, second.uri, second.stats) == (first.key, first.uri, first.stats)
    assert _files(first.uri) == written  # same files, same inodes: the entry was not rebuilt


def _changed_tokenizer(setup) -> dict:
    folder = setup.tmp / "other-tokenizer"
    build_tokenizer(folder, chat_template=stage.formatting.PLAIN_USER + "{{ messages[0]['content'] }}")
    return {"model": model_artifact(folder)}


def _changed_data(setup) -> dict:
    rows = canonical_rows()
    rows[0]["messages"][1]["content"] += "!"  # one byte
    return {"data": write_data(setup.tmp / "changed.jsonl", rows)}


CHANGES = {
    "data-byte": _changed_data,
    "tokenizer-file": _changed_tokenizer,
    "template": lambda s: {"options": s.options.model_copy(update={"chat_template": "plain"})},
    "system-prompt-mode": lambda s: {"options": s.options.model_copy(update={"system_prompt_mode": "none"})},
    "system-prompt-text": lambda s: {"options": s.options.model_copy(
        update={"system_prompt_mode": "custom", "system_prompt": "Be brief."})},
    "max-length": lambda s: {"options": s.options.model_copy(update={"max_length": 97})},
    "truncation": lambda s: {"options": s.options.model_copy(update={"truncation": "truncate_response"})},
    "train-on": lambda s: {"options": s.options.model_copy(update={"train_on": "last_assistant"})},
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_content_change_misses(setup, change):
    base = dict(data=setup.data, model=setup.model, options=setup.options, cache_dir=setup.cache)
    changed = {**base, **CHANGES[change](setup)}
    assert stage.tokenize_entry(**changed)[0] != stage.tokenize_entry(**base)[0]


def test_renamed_or_moved_data_hits(setup):
    first = stage.tokenize_dataset(setup.data, setup.model, setup.options, setup.cache)
    moved = setup.tmp / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.move(setup.data.uri, moved)
    data = DataArtifact(stage="validate-data", uri=str(moved), key=hash_url(str(moved)), report_uri="", stats={})
    again = stage.tokenize_dataset(data, setup.model, setup.options, setup.cache)
    assert again.store_hit and again.key == first.key


def test_deleted_entry_is_rebuilt_and_not_served_by_prefect(setup):
    first = stage.tokenize_dataset(setup.data, setup.model, setup.options, setup.cache)
    prefect_key = content_cache_key(stage.tokenize_entry)
    stored = set()  # a stand-in for Prefect's result store
    context = SimpleNamespace(task=SimpleNamespace(name="tokenize-and-cache"), result_store=SimpleNamespace(
        exists=lambda key: key in stored))
    parameters = {"data": setup.data, "model": setup.model, "options": setup.options, "cache_dir": setup.cache}
    key = prefect_key(context, parameters)
    assert key.startswith(f"tokenize-and-cache-{first.key[:32]}")
    stored.add(key)
    shutil.rmtree(first.uri)
    assert prefect_key(context, parameters) is None  # Prefect recomputes instead of returning a dead path
    again = stage.tokenize_dataset(setup.data, setup.model, setup.options, setup.cache)
    assert not again.store_hit and datasets.load_from_disk(again.uri)["train"].num_rows == 6


def test_corrupt_entry_is_rebuilt(setup):
    first = stage.tokenize_dataset(setup.data, setup.model, setup.options, setup.cache)
    arrow = next(Path(first.uri, "train").glob("*.arrow"))
    arrow.write_bytes(b"not arrow at all")
    again = stage.tokenize_dataset(setup.data, setup.model, setup.options, setup.cache)
    assert not again.store_hit
    assert datasets.load_from_disk(again.uri)["train"].num_rows == 6
    assert stage.tokenize_dataset(setup.data, setup.model, setup.options, setup.cache).store_hit


def test_concurrent_builds_of_one_key_do_not_corrupt_it(setup, monkeypatch):
    """Both runs build, then publish at the same moment: one entry, complete, no scratch left."""
    barrier = threading.Barrier(2, timeout=30)
    assemble = stage.assemble

    def assemble_together(*args, **kwargs):
        barrier.wait()
        return assemble(*args, **kwargs)

    monkeypatch.setattr(stage, "assemble", assemble_together)
    results, errors = [], []

    def run():
        try:
            results.append(stage.tokenize_dataset(setup.data, setup.model, setup.options, setup.cache))
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2 and results[0].uri == results[1].uri
    assert stage.read_entry(results[0].uri) == {**results[0].stats, "shards": {"total": 1}}
    leftovers = [p.name for p in Path(results[0].uri).parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_cache_behind_credentials_is_read_written_reused_and_rebuilt_with_them(setup, locked_cache):
    """The validated rows and the model are entries of that cache too, as the flow hands them on."""
    from tests.conftest import LockedMemoryFileSystem

    cache_dir, cache_options = locked_cache
    data = setup.data.model_copy(update={"uri": f"{cache_dir}/validated/rows/data.jsonl"})
    storage.write_bytes_atomic(data.uri, Path(setup.data.uri).read_bytes(), cache_options)
    model = setup.model.model_copy(update={"uri": f"{cache_dir}/models/tiny"})
    with storage.atomic_directory(model.uri, cache_options) as scratch:
        shutil.copytree(setup.model.uri, scratch, dirs_exist_ok=True)
    local = stage.tokenize_dataset(setup.data, setup.model, setup.options, setup.cache)
    first = stage.tokenize_dataset(data, model, setup.options, cache_dir, cache_options)
    assert first.uri == f"{cache_dir}/tokenized/{local.key}" and not first.store_hit
    assert datasets.load_from_disk(first.uri, storage_options=cache_options)["train"]["input_ids"] == (
        datasets.load_from_disk(local.uri)["train"]["input_ids"]
    )
    again = stage.tokenize_dataset(data, model, setup.options, cache_dir, cache_options)
    assert again.store_hit and again.stats["train"] == first.stats["train"] and again.stats["shards"] == {"total": 1, "built": 0}
    fs, path = storage.filesystem(first.uri, cache_options)
    fs.rm(f"{path}/{storage.COMPLETE_MARKER}")  # a half-written entry
    rebuilt = stage.tokenize_dataset(data, model, setup.options, cache_dir, cache_options)
    assert not rebuilt.store_hit and storage.is_complete(rebuilt.uri, cache_options)
    assert LockedMemoryFileSystem.refused == []


def test_template_error_names_the_source(setup, tmp_path):
    folder = tmp_path / "unstable-tokenizer"
    build_tokenizer(folder, chat_template="{% for m in messages %}{% if loop.last %}!{% endif %}"
                                          "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(TemplateError, match="alpaca.json:0"):
        stage.tokenize_dataset(setup.data, model_artifact(folder), setup.options, setup.cache)


def test_task_wrapper_runs_outside_a_flow(setup):
    result = stage.tokenize_task.fn(setup.data, setup.model, setup.options, setup.cache)
    assert result.stats["train"]["kept"] == 6


def test_chunked_encoding_gives_the_same_rows(setup, monkeypatch):
    tokenizer = stage.formatting.load_tokenizer(setup.model.uri)

    def encoded() -> pa.Table:
        return pa.Table.from_batches(list(stage._encoded_batches(read_canonical(setup.data.uri), tokenizer, setup.options)))

    whole = encoded()
    monkeypatch.setattr(stage, "CHUNK", 3)
    chunked = encoded()
    assert chunked.num_rows == whole.num_rows == len(canonical_rows())
    assert chunked.to_pylist() == whole.to_pylist()


# --- splits that end up empty ------------------------------------------------------------------


def test_every_row_too_long_names_max_length_and_publishes_nothing(setup):
    """The dry run calls this same stage, so it fails too instead of reporting 'kept 0'."""
    tokenizer = stage.formatting.load_tokenizer(setup.model.uri)
    conversations = [row["messages"] for row in canonical_rows()]
    full = stage.formatting.encode_batch(conversations, tokenizer, TemplateOptions(max_length=1_048_576))
    longest = max(len(result.input_ids) if hasattr(result, "input_ids") else result.length for result in full)
    with pytest.raises(stage.TokenizeError) as caught:
        stage.tokenize_task.fn(setup.data, setup.model, TemplateOptions(max_length=8), setup.cache)
    message = str(caught.value)
    assert message.startswith("no train rows left after tokenizing: all 8 were dropped, 7 longer than template.max_length=8 tokens")
    assert f"the longest has {longest} tokens" in message
    assert message.endswith(f"--template.max_length {longest} or --template.truncation truncate_response")
    assert isinstance(caught.value, DataValidationError) and not list(Path(setup.cache).glob("tokenized/*"))
    assert not stage.tokenize_task.retry_condition_fn(None, None, Failed(data=caught.value))
    with pytest.raises(stage.TokenizeError) as caught:  # truncation cannot keep a prompt that alone is too long
        stage.tokenize_dataset(setup.data, setup.model, TemplateOptions(max_length=8, truncation="truncate_response"), setup.cache)
    assert str(caught.value).endswith(f"To keep them: --template.max_length {longest}")


SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
LONG = [{"role": "user", "content": "Say hello. " * 40}, {"role": "assistant", "content": "Hello!"}]


@pytest.mark.parametrize("empty, rows", [("train", 2), ("eval", 1)])
def test_one_split_left_empty_is_named(setup, empty, rows):
    splits = ["train", "train", "eval"]
    data = write_data(setup.tmp / "split.jsonl", [
        {"messages": LONG if split == empty else SHORT, "split": split, "source": f"split.jsonl:{i}"} for i, split in enumerate(splits)
    ])
    with pytest.raises(stage.TokenizeError, match=f"^no {empty} rows left after tokenizing: all {rows} were dropped, {rows} longer "
                                                  "than template.max_length=96 tokens"):
        stage.tokenize_dataset(data, setup.model, setup.options, setup.cache)


def test_no_eval_rows_at_all_is_fine(setup):
    data = write_data(setup.tmp / "train-only.jsonl", [{"messages": SHORT, "split": "train", "source": "t.jsonl:0"}])
    result = stage.tokenize_dataset(data, setup.model, setup.options, setup.cache)
    assert (result.stats["train"]["kept"], result.stats["eval"]["rows"]) == (1, 0)
