"""Readers of the input data: where the files are (globs, folders, Hugging Face dataset ids), their
bytes (bounded, decompressed) and their rows (JSON, JSON Lines, CSV, TSV, Parquet, the Hub).

Pure: no Prefect, no pandera, no config model. What the rows mean is the validate stage's business
(`tasks/validate.py`); here a file is only refused when it cannot be read as rows at all."""

from __future__ import annotations

import csv
import errno
import gzip
import io
import json
import lzma
import os
import re
import stat
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.core import storage
from tasks.core.embedded import embedded_eval_urls, resolve_data_urls

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
FILE_KINDS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataValidationError(ValueError):
    """The data is bad: found before tokenizing, and no retry can fix it."""


class FileProblem(Exception):
    """A whole file cannot be used; the caller prefixes the file's name."""


# --- sources -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    url: str  # a file URL, or a Hugging Face dataset id when hub_split is set
    split: str  # "train" or "eval"
    hub_split: str | None = None

    @property
    def name(self) -> str:
        return f"{self.url}[{self.hub_split}]" if self.hub_split else self.url


def resolve_sources(data: list[str], eval_data: list[str], storage_options: dict[str, Any], hf_split: str) -> list[Source]:
    """Every input file (globs expanded, sorted) or dataset id, training sources first; a dataset id
    reads its `hf_split`."""
    eval_urls = list(eval_data) or embedded_eval_urls(data)
    return [
        source
        for split, urls in (("train", resolve_data_urls(data)), ("eval", resolve_data_urls(eval_urls)))
        for url in urls
        for source in _expand(url, split, storage_options, hf_split)
    ]


def _expand(url: str, split: str, storage_options: dict[str, Any], hf_split: str) -> list[Source]:
    fs, path = storage.filesystem(url, storage_options)
    if any(char in path for char in "*?["):
        matches = sorted(match for match in fs.glob(path) if not fs.isdir(match))
        if not matches:
            raise DataValidationError(f"{url}: the glob matched no files")
        return [_file_source(url, fs, match, split) for match in matches]
    _refuse_special_file(fs, path, url)
    if fs.isdir(path):
        files = sorted(item for item in fs.ls(path, detail=False) if _file_kind_of(item))
        if not files:
            raise DataValidationError(f"{url}: the folder holds no JSON, JSONL, CSV or Parquet files")
        return [_file_source(url, fs, item, split) for item in files]
    if fs.exists(path):
        return [Source(url, split)]
    if HUB_ID.match(url) and not _file_kind_of(url):
        return [Source(url, split, hub_split=hf_split)]
    raise DataValidationError(f"{url}: no such file (nor a glob, folder or Hugging Face dataset id)")


def _file_kind_of(url: str) -> str | None:
    return file_kind_and_compression(url)[0]


def file_kind_and_compression(url: str) -> tuple[str | None, str | None]:
    """What the file's name says it is: (json|csv|tsv|parquet or None, gzip|bz2|xz or None)."""
    name = url.rsplit("/", 1)[-1].lower()
    compression = next((COMPRESSIONS[suffix] for suffix in COMPRESSIONS if name.endswith(suffix)), None)
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    return (FILE_KINDS.get("." + name.rsplit(".", 1)[-1]) if "." in name else None), compression


def _with_protocol(url: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if "://" in url else path


def _file_source(url: str, fs: fsspec.AbstractFileSystem, path: str, split: str) -> Source:
    name = _with_protocol(url, fs, path)
    _refuse_special_file(fs, path, name)
    return Source(name, split)


def _refuse_special_file(fs: fsspec.AbstractFileSystem, path: str, name: str) -> None:
    """Refuse a local path that is neither a regular file nor a folder, before anything opens it:
    opening a FIFO blocks until a writer comes, and a device such as /dev/zero never ends."""
    if not isinstance(fs, LocalFileSystem):
        return  # objects elsewhere are read no further than their reported size (read_chunks)
    try:
        mode = os.stat(path).st_mode  # follows links: zero.jsonl -> /dev/zero is a device
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataValidationError(f"{name}: symlink loop ({exc.strerror}); point the link at a real file") from exc
        return  # a missing path is reported by the caller, which also tries globs and hub ids
    kind = next((kind for test, kind in SPECIAL_FILES if test(mode)), None)
    if kind is not None:
        raise DataValidationError(f"{name}: not a regular file ({kind}); give a JSON, JSONL, CSV or Parquet file, or a folder of them")


# --- bytes -------------------------------------------------------------------------------------


def read_source(source: Source, storage_options: dict[str, Any]) -> bytes | None:
    """The file's bytes as stored (compressed or not); None for a hub dataset."""
    if source.hub_split:
        return None
    return b"".join(read_chunks(source, storage_options))


def read_chunks(source: Source, storage_options: dict[str, Any], chunk: int = 1 << 20) -> Iterator[bytes]:
    """The stored bytes, never more than the store reports: a stream that does not end (a device
    behind some filesystem, a misbehaving store) fails instead of filling the memory."""
    fs, path = storage.filesystem(source.url, storage_options)
    size = fs.size(path)
    if size is None:
        raise DataValidationError(f"{source.name}: its store reports no size, so it cannot be read safely; copy it to a local file first")
    left = size + 1  # one byte past the reported size tells a longer stream
    with fsspec.open(source.url, "rb", **storage_options) as handle:
        while left and (block := handle.read(min(chunk, left))):
            left -= len(block)
            yield block
    if not left:
        raise DataValidationError(
            f"{source.name}: holds more than the {size} bytes its store reports (still being written, or not a plain file); "
            "run again once it is complete"
        )


def _decompress(url: str, raw: bytes) -> bytes:
    compression = file_kind_and_compression(url)[1]
    if compression is None:
        return raw
    try:
        with fsspec.compression.compr[compression](io.BytesIO(raw)) as handle:
            return handle.read()
    except (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError) as exc:
        raise FileProblem(f"not valid {compression} data ({exc})") from exc
    except OSError as exc:
        if compression == "bz2" and "data stream" in str(exc):
            raise FileProblem(f"not valid bz2 data ({exc})") from exc
        raise


# --- rows --------------------------------------------------------------------------------------


@dataclass
class LoadedFile:
    source: Source
    rows: list[Any]
    lines: list[int] | None = None  # 1-based line of each row, where a line means something
    json_text: str | None = None  # a JSON array's text: its lines are found only when needed
    first_row: int = 0  # the file's row number of rows[0] (a shard of a JSON Lines file)

    def line(self, row: int) -> int | None:
        """The line of the file's row `row` (numbered as in the whole file)."""
        if self.lines is None and self.json_text is not None:
            self.lines = _json_array_lines(self.json_text)
        index = row - self.first_row
        return self.lines[index] if self.lines is not None and 0 <= index < len(self.lines) else None

    @property
    def row_numbers(self) -> range:
        return range(self.first_row, self.first_row + len(self.rows))


def load_source(source: Source, raw: bytes | None) -> LoadedFile:
    """Parse one input from the bytes that were read (and hashed) for it; a hub split loads here."""
    if source.hub_split:
        return LoadedFile(source, _hub_rows(source.url, source.hub_split))
    raw = _decompress(source.url, raw)
    if not raw.strip():
        raise FileProblem("the file is empty")
    kind = _file_kind_of(source.url)
    _refuse_misnamed(source.url, kind, raw)
    kind = kind or _sniff_kind(raw)
    if kind == "parquet":
        loaded = LoadedFile(source, _parquet_rows(raw))
    else:
        loaded = _parse_text(source, kind, _decode(raw))
    if not loaded.rows:
        raise FileProblem("the file has no rows")
    return loaded


def load_jsonl_range(source: Source, raw: bytes, first_row: int, first_line: int) -> LoadedFile:
    """Rows `first_row`... of a JSON Lines file, from the bytes of whole lines starting at line
    `first_line`: rows, lines and errors are numbered as in the whole file."""
    rows, lines = _jsonl_rows(_decode(raw), first_row, first_line)
    return LoadedFile(source, rows, lines, first_row=first_row)


def _refuse_misnamed(url: str, kind: str | None, raw: bytes) -> None:
    """Binary content under a text file's name would only be reported as 'not UTF-8'. Refused rather
    than read as what it is: a name that lies usually means the wrong file, and other tools trust it."""
    name = url.rsplit("/", 1)[-1]
    compressed = name.lower().endswith(tuple(COMPRESSIONS))
    if raw.startswith(b"PAR1") and kind not in ("parquet", None):
        stem = name.rsplit(".", 2 if compressed else 1)[0]
        raise FileProblem(f"a Parquet file: name it {stem}.parquet (the name says {kind.upper()})")
    if raw.startswith(b"\x1f\x8b") and not compressed:
        raise FileProblem(f"gzip-compressed: name it {name}.gz, or decompress it")


def _sniff_kind(raw: bytes) -> str:
    if raw.startswith(b"PAR1"):
        return "parquet"
    if raw.lstrip()[:1] in (b"[", b"{"):
        return "json"
    raise FileProblem("unsupported file type: use JSON, JSON Lines (optionally .gz), CSV or Parquet")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileProblem(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8") from exc


def _parse_text(source: Source, kind: str, text: str) -> LoadedFile:
    if kind in ("csv", "tsv"):
        rows, lines = _csv_rows(text, "\t" if kind == "tsv" else ",")
        return LoadedFile(source, rows, lines)
    if text.lstrip().startswith("["):
        return LoadedFile(source, _json_array_rows(text), json_text=text)
    rows, lines = _jsonl_rows(text)
    return LoadedFile(source, rows, lines)


class _Refused(Exception):
    """JSON that Python's parser would accept (or overflow on) but that is not usable data."""


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not valid JSON (JSON has no NaN or Infinity): write a string, or null for a missing value")


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) < len(pairs):  # json.loads would silently keep the last value
        keys = [key for key, _ in pairs]
        twice = next(key for index, key in enumerate(keys) if key in keys[:index])
        raise _Refused(f"key {twice!r} appears twice in one object: keep one")
    return record


STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_refuse_duplicate_keys)


def _strict_loads(text: str) -> Any:
    try:
        return STRICT_JSON.decode(text)
    except RecursionError as exc:  # the C parser recurses once per level of [ or {
        raise _Refused("nested too deeply for the JSON parser (hundreds of levels of [ or {): rows must be flat objects of text") from exc


def _json_array_rows(text: str) -> list[Any]:
    try:
        return _strict_loads(text)
    except json.JSONDecodeError as exc:
        raise FileProblem(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    except _Refused as exc:
        raise FileProblem(_json_array_refusal(text, exc)) from exc


def _json_array_refusal(text: str, refused: _Refused) -> str:
    """The refusal prefixed with the row and line of the element that causes it."""
    lines: list[int] = []
    try:
        lines.extend(_json_array_starts(text, STRICT_JSON))
    except (_Refused, RecursionError):
        pass  # the element whose start was appended last is the one refused
    return f"row {len(lines) - 1} (0-based), line {lines[-1]}: {refused}" if lines else str(refused)


def _json_array_lines(text: str) -> list[int]:
    """The line on which each element of a (valid) JSON array starts."""
    return list(_json_array_starts(text, json.JSONDecoder()))


def _json_array_starts(text: str, decoder: json.JSONDecoder) -> Iterator[int]:
    separators = re.compile(r"[\s,]*")
    position, line, counted = text.index("[") + 1, 1, 0
    while (position := separators.match(text, position).end()) < len(text) and text[position] != "]":
        line, counted = line + text.count("\n", counted, position), position
        yield line
        _, position = decoder.raw_decode(text, position)


def _jsonl_rows(text: str, first_row: int = 0, first_line: int = 1) -> tuple[list[Any], list[int]]:
    rows, lines = [], []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for number, line in enumerate(text.split("\n"), start=first_line):
        if not line.strip():
            continue
        try:
            rows.append(_strict_loads(line))
        except json.JSONDecodeError as exc:
            raise FileProblem(_jsonl_error(text, number, exc)) from exc
        except _Refused as exc:
            raise FileProblem(f"row {first_row + len(rows)} (0-based), line {number}: {exc}") from exc
        lines.append(number)
    return rows, lines


def _jsonl_error(text: str, number: int, exc: json.JSONDecodeError) -> str:
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return f"not valid JSON Lines: line {number}: {exc.msg} (column {exc.colno})"
    return "one JSON value spread over several lines: expected a JSON array of rows or JSON Lines (one object a line)"


def _csv_rows(text: str, delimiter: str) -> tuple[list[dict[str, Any]], list[int]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows, lines = [], []
    try:
        if reader.fieldnames is None:
            return [], []
        start = reader.line_num + 1
        for row in reader:
            row.pop(None, None)  # cells beyond the header have no column to belong to
            rows.append(row)
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise FileProblem(f"not valid CSV at line {reader.line_num}: {exc}") from exc
    return rows, lines


def _parquet_rows(raw: bytes) -> list[dict[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(io.BytesIO(raw)).to_pylist()
    except (pyarrow.ArrowInvalid, OSError) as exc:
        raise FileProblem(f"not a valid Parquet file ({exc})") from exc


def _hub_rows(dataset_id: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split).to_list()
    except FileNotFoundError as exc:  # DatasetNotFoundError; network errors propagate and are retried
        raise FileProblem(f"no such file, and no Hugging Face dataset by that id ({exc})") from exc
