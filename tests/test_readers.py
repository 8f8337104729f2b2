"""The readers: which files a URL names, their bytes (bounded), their rows in every file type, and
every file that cannot be read as rows refused with the reason (and row and line where it has one)."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
import uuid

import fsspec
import pyarrow
import pyarrow.parquet
import pytest
from fsspec.spec import AbstractFileSystem

from tasks.core import embedded, storage
from tasks.core.hashing import hash_bytes
from tasks.core.readers import (
    DataValidationError,
    FileProblem,
    LoadedFile,
    Source,
    load_source,
    read_source,
    resolve_sources,
)
from tasks.core.shards import plan_shards
from tests.conftest import ALPACA_ROWS

CHAT_ROW = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Fennec."},
    ]
}
GOOD = {"instruction": "Q?", "output": "A."}
COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}


@pytest.fixture()
def mem():
    """A fresh memory:// folder, removed afterwards (the memory filesystem is process-wide)."""
    root = f"memory://data-{uuid.uuid4().hex[:8]}"
    yield root
    fs, path = storage.filesystem(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def encode(rows: list, kind: str) -> bytes:
    """`rows` as a file of `kind`: json, jsonl, csv, tsv or parquet, optionally .gz/.bz2/.xz."""
    kind, _, compression = kind.partition(".")
    if kind == "json":
        data = json.dumps(rows, indent=2).encode()
    elif kind == "jsonl":
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    elif kind in ("csv", "tsv"):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
        data = text.getvalue().encode()
    else:
        buffer = io.BytesIO()
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), buffer)
        data = buffer.getvalue()
    return COMPRESS[compression](data) if compression else data


def put(url: str, content: bytes | str | list, kind: str = "json") -> str:
    data = content.encode() if isinstance(content, str) else content if isinstance(content, bytes) else encode(content, kind)
    with fsspec.open(url, "wb") as handle:
        handle.write(data)
    return url


def sources(*urls: str, eval_urls: tuple[str, ...] = (), hf_split: str = "train") -> list[Source]:
    return resolve_sources(list(urls), list(eval_urls), {}, hf_split)


def load(url: str) -> LoadedFile:
    [source] = sources(url)
    return load_source(source, read_source(source, {}))


def problem(url: str) -> str:
    with pytest.raises(FileProblem) as caught:
        load(url)
    return str(caught.value)


def refused(*urls: str) -> str:
    with pytest.raises(DataValidationError) as caught:
        for source in sources(*urls):
            read_source(source, {})
    return str(caught.value)


# --- rows of every file type -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["json", "jsonl", "jsonl.gz", "jsonl.bz2", "json.xz", "csv", "tsv", "parquet"])
def test_every_file_type_gives_the_same_rows(mem, kind):
    assert load(put(f"{mem}/rows.{kind}", ALPACA_ROWS, kind)).rows == ALPACA_ROWS


def test_nested_rows_survive_parquet_and_jsonl(mem):
    assert load(put(f"{mem}/chat.parquet", [CHAT_ROW], "parquet")).rows == [CHAT_ROW]
    assert load(put(f"{mem}/chat.jsonl", [CHAT_ROW], "jsonl")).rows == [CHAT_ROW]


def test_each_row_knows_its_line(mem):
    """The line a row starts on, for the error that names it; Parquet has no lines."""
    jsonl = load(put(f"{mem}/a.jsonl", f"{json.dumps(GOOD)}\n\n{json.dumps(GOOD)}\n"))
    array = load(put(f"{mem}/a.json", [GOOD, {"instruction": "Q?", "output": 1}]))
    table = load(put(f"{mem}/a.csv", 'instruction,output\n"two\nlines",A.\nQ?,A.\n'))
    parquet = load(put(f"{mem}/a.parquet", [GOOD], "parquet"))
    assert [jsonl.line(0), jsonl.line(1)] == [1, 3]
    assert [array.line(0), array.line(1)] == [2, 6]
    assert [table.line(0), table.line(1)] == [2, 4]
    assert parquet.line(0) is None


def test_stored_bytes_are_read_as_stored_and_hashed_alike(mem):
    url = put(f"{mem}/rows.jsonl.gz", ALPACA_ROWS, "jsonl.gz")
    [source] = sources(url)
    raw = read_source(source, {})
    assert raw == encode(ALPACA_ROWS, "jsonl.gz")  # compressed: the key hashes the file as stored
    assert plan_shards([source], {}, shard_rows=2)[0].digest == hash_bytes(raw)  # one shard: compressed files are not cut


# --- which files a URL names -------------------------------------------------------------------


def test_glob_and_folder_give_their_data_files_in_sorted_order(mem):
    put(f"{mem}/folder/part-2.jsonl", ALPACA_ROWS[4:], "jsonl")
    put(f"{mem}/folder/part-1.json", ALPACA_ROWS[:4])
    put(f"{mem}/folder/notes.txt", "not data")
    names = ["part-1.json", "part-2.jsonl"]
    for url in (f"{mem}/folder/part-*", f"{mem}/folder"):
        found = sources(url)
        assert [source.url.rsplit("/", 1)[-1] for source in found] == names and {source.split for source in found} == {"train"}


def test_local_path_and_file_url_name_the_same_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(encode(ALPACA_ROWS, "jsonl"))
    assert load(str(path)).rows == load(f"file://{path}").rows == ALPACA_ROWS


def test_eval_files_follow_the_training_files(mem):
    train, held = put(f"{mem}/train.jsonl", [GOOD], "jsonl"), put(f"{mem}/eval.jsonl", [GOOD], "jsonl")
    assert sources(train, eval_urls=(held,)) == [Source(train, "train"), Source(held, "eval")]


def test_embedded_dataset_brings_its_eval_file(monkeypatch, tmp_path):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_bytes(encode([CHAT_ROW], "jsonl"))
    held_out.write_bytes(encode([CHAT_ROW], "jsonl"))
    monkeypatch.setitem(embedded.EMBEDDED_DATASETS, "embedded:identity-demo", (train, held_out))
    assert sources("embedded:identity-demo") == [Source(str(train), "train"), Source(str(held_out), "eval")]


def test_hub_id_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ALPACA_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    [source] = sources("someone/alpaca-demo", hf_split="train[:8]")
    assert source.name == "someone/alpaca-demo[train[:8]]" and read_source(source, {}) is None
    assert load_source(source, None).rows == ALPACA_ROWS and calls == [("someone/alpaca-demo", "train[:8]")]


def test_urls_that_name_no_file(mem):
    assert refused(f"{mem}/*.jsonl") == f"{mem}/*.jsonl: the glob matched no files"
    assert "no such file" in refused(f"{mem}/absent.jsonl")
    assert "no such file" in refused("someone/rows.jsonl")  # a data file's name is never a hub id
    put(f"{mem}/folder/notes.txt", "not data")
    assert refused(f"{mem}/folder") == f"{mem}/folder: the folder holds no JSON, JSONL, CSV or Parquet files"


# --- files that cannot be read as rows ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("broken.json", '[{"instruction": "Q?",', "not valid JSON"),
        ("broken.jsonl", '{"prompt": "a", "completion": "b"}\n{oops}\n', "not valid JSON Lines: line 2"),
        ("spread.jsonl", '{"prompt": "a",\n "completion": "b"}\n', "one JSON value spread over several lines"),
        ("latin1.jsonl", '{"prompt": "caf\xe9", "completion": "b"}\n'.encode("latin-1"), "not UTF-8 text (byte 0xe9"),
        ("empty.jsonl", "", "the file is empty"),
        ("blank.json", "  \n", "the file is empty"),
        ("none.json", "[]", "the file has no rows"),
        ("header.csv", "instruction,output\n", "the file has no rows"),
        ("broken.jsonl.gz", b"not gzip", "not valid gzip data"),
        ("broken.jsonl.bz2", b"not bz2", "not valid bz2 data"),
        ("broken.parquet", b"PAR1 not parquet", "not a valid Parquet file"),
        ("notes.txt", "plain text", "unsupported file type"),
    ],
)
def test_unreadable_file_is_one_clear_line(mem, name, content, reason):
    message = problem(put(f"{mem}/{name}", content))
    assert reason in message and "\n" not in message


DEEP = "[" * 10_000 + "]" * 10_000
ROW = '{"instruction": "Q?", "output": "A."}'
JSON_CASES = [
    ("deep.jsonl", f'{ROW}\n{{"instruction": {DEEP}, "output": "A."}}\n', "row 1 (0-based), line 2", "nested too deeply"),
    ("deep.json", f'[{ROW},\n {{"instruction": {DEEP}, "output": "A."}}]', "row 1 (0-based), line 2", "nested too deeply"),
    ("nan.jsonl", f'{ROW}\n{{"instruction": "Q?", "input": NaN, "output": "A."}}\n', "row 1 (0-based), line 2", "NaN is not valid JSON"),
    ("nan.json", f'[\n  {ROW},\n  {{"instruction": "Q?", "input": NaN, "output": "A."}}\n]', "row 1 (0-based), line 3", "NaN is not valid JSON"),
    ("inf.jsonl", '{"instruction": "Q?", "input": Infinity, "output": "A."}\n', "row 0 (0-based), line 1", "Infinity is not valid JSON"),
    ("minus-inf.json", '[{"instruction": "Q?", "input": -Infinity, "output": "A."}]', "row 0 (0-based), line 1", "-Infinity is not"),
    ("twice.jsonl", f'{ROW}\n{{"instruction": "a", "instruction": "b", "output": "A."}}\n', "row 1 (0-based), line 2", "key 'instruction' appears twice"),
    ("twice.json", '[{"messages": [{"role": "user", "content": "Q", "content": "R"}]}]', "row 0 (0-based), line 1", "key 'content' appears twice"),
]


@pytest.mark.parametrize("name, content, where, reason", JSON_CASES, ids=[case[0] for case in JSON_CASES])
def test_json_that_python_would_accept_or_choke_on_is_refused_by_row_and_line(mem, name, content, where, reason):
    message = problem(put(f"{mem}/{name}", content))
    assert message.startswith(f"{where}: ") and reason in message and "\n" not in message


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("rows.json", encode(ALPACA_ROWS, "parquet"), "a Parquet file: name it rows.parquet"),
        ("rows.jsonl", encode(ALPACA_ROWS, "jsonl.gz"), "gzip-compressed: name it rows.jsonl.gz"),
    ],
    ids=["parquet", "gzip"],
)
def test_binary_content_under_a_text_name_says_what_it_is(mem, name, content, reason):
    message = problem(put(f"{mem}/{name}", content))
    assert message.startswith(reason) and "UTF-8" not in message


# --- special files and endless streams ---------------------------------------------------------


@pytest.mark.timeout(30)
def test_fifo_is_refused_before_it_is_opened(tmp_path):
    """Opening a FIFO blocks until a writer comes: finding the sources must refuse it unopened
    (the stage and its cache key both start there)."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataValidationError) as caught:
        sources(str(fifo))
    assert str(caught.value).startswith(f"{fifo}: not a regular file (a FIFO)")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pattern", ["{folder}", "{folder}/*.jsonl"], ids=["folder", "glob"])
def test_fifo_inside_a_folder_or_glob_is_refused(tmp_path, pattern):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(encode(ALPACA_ROWS, "jsonl"))
    os.mkfifo(folder / "b.jsonl")
    assert f"{folder}/b.jsonl: not a regular file (a FIFO)" in refused(pattern.format(folder=folder))


@pytest.mark.timeout(30)
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_character_device_is_refused_directly_or_through_a_link(tmp_path):
    """/dev/zero never ends: reading it would fill the memory (and ignore SIGTERM meanwhile)."""
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    for url in (str(link), "/dev/zero"):
        assert refused(url).startswith(f"{url}: not a regular file (a character device)")


def test_symlink_loop_is_named_as_such(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.symlink_to(second)
    second.symlink_to(first)
    message = refused(str(first))
    assert message.startswith(f"{first}: symlink loop") and "no such file" not in message
    assert "symlink loop" in refused(f"{tmp_path}/*.jsonl")


class EndlessFileSystem(AbstractFileSystem):
    """An object store whose objects report `size` bytes (or none) but stream zeros for ever."""

    protocol = "endless"
    size_reported: int | None = 64

    def info(self, path, **kwargs):
        return {"name": path, "size": self.size_reported, "type": "file"}

    def _open(self, path, mode="rb", **kwargs):
        class Zeros(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, buffer):  # a trickle: without the bound, memory grows slowly
                buffer[:16] = bytes(min(16, len(buffer)))
                return min(16, len(buffer))

        return io.BufferedReader(Zeros())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size, reason", [(64, "more than the 64 bytes"), (None, "reports no size")])
def test_remote_object_is_read_no_further_than_its_reported_size(monkeypatch, size, reason):
    fsspec.register_implementation("endless", EndlessFileSystem, clobber=True)
    monkeypatch.setattr(EndlessFileSystem, "size_reported", size)
    url = "endless://bucket/rows.jsonl"
    assert refused(url).startswith(f"{url}: ") and reason in refused(url)
    with pytest.raises(DataValidationError, match=reason):
        plan_shards([Source(url, "train")], {}, shard_rows=2)  # the cache key's streamed hash is bounded too
