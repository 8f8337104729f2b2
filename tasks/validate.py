"""validate-data: read the data wherever it lives, map every format onto the canonical rows, and
reject or report every bad row (pandera, `schemas/data.py`) before anything is tokenized.

The entry `cache_dir/validated/<key>/` holds `data.jsonl` (one canonical row a line:
{"messages": [...], "split": "train"|"eval", "source": "<file>:<row>"}) and `report.json`. The key
hashes the input bytes, the options and this code; the artifact's own key is the hash of the
rows' text and split (not their `source` labels), which is what later stages cache on."""

from __future__ import annotations

import csv
import errno
import functools
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import stat
import statistics
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
import pandas as pd
import pandera.pandas as pa
from fsspec.implementations.local import LocalFileSystem
from prefect import task

import schemas.data as data_schema
from schemas.config import DataOptions
from schemas.manifests import DataArtifact
from tasks.artifacts import publisher
from tasks.caching import content_cache_key, ensure_record_matches
from tasks.core import storage
from tasks.core.embedded import embedded_eval_urls, resolve_data_urls
from tasks.core.hashing import code_version, hash_bytes, hash_parts
from tasks.retrying import retry_transient

STAGE = "validate-data"
CODE_VERSION = code_version(sys.modules[__name__], data_schema)
MESSAGE_ROWS = 20  # failing rows quoted in the error; the report file has all of them
STAT_FIELDS = (
    "rows_read", "rows_kept", "train_rows", "eval_rows", "eval_rows_in_train", "rows_dropped", "dropped_by_reason", "duplicates", "chars",
)
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
FILE_KINDS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# pandera's check names, shortened to the reasons the report counts by
REASONS = {data_schema.NULL: "null"}

logger = logging.getLogger(__name__)


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


def resolve_sources(data: list[str], eval_data: list[str], options: DataOptions) -> list[Source]:
    """Every input file (globs expanded, sorted) or dataset id, training sources first."""
    eval_urls = list(eval_data) or embedded_eval_urls(data)
    return [
        source
        for split, urls in (("train", resolve_data_urls(data)), ("eval", resolve_data_urls(eval_urls)))
        for url in urls
        for source in _expand(url, split, options)
    ]


def _expand(url: str, split: str, options: DataOptions) -> list[Source]:
    fs, path = storage.filesystem(url, options.storage_options)
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
        return [Source(url, split, hub_split=options.hf_split)]
    raise DataValidationError(f"{url}: no such file (nor a glob, folder or Hugging Face dataset id)")


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
        return  # objects elsewhere are read no further than their reported size (_read_chunks)
    try:
        mode = os.stat(path).st_mode  # follows links: zero.jsonl -> /dev/zero is a device
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataValidationError(f"{name}: symlink loop ({exc.strerror}); point the link at a real file") from exc
        return  # a missing path is reported by the caller, which also tries globs and hub ids
    kind = next((kind for test, kind in SPECIAL_FILES if test(mode)), None)
    if kind is not None:
        raise DataValidationError(f"{name}: not a regular file ({kind}); give a JSON, JSONL, CSV or Parquet file, or a folder of them")


def _source_hash(source: Source, raw: bytes | None) -> str:
    return hash_parts("hub", source.url, source.hub_split) if source.hub_split else hash_bytes(raw)


def _entry(sources: list[Source], hashes: list[str], options: DataOptions, cache_dir: str) -> tuple[str, str]:
    # Credentials and endpoints say where the bytes are, not what they are: not part of the key.
    settings = options.model_dump(mode="json", exclude={"storage_options"})
    inputs = [[source.split, digest] for source, digest in zip(sources, hashes)]
    key = hash_parts(inputs, settings, CODE_VERSION)
    return key, storage.join(cache_dir, "validated", key)


def validate_entry(data: list[str], eval_data: list[str], options: DataOptions, cache_dir: str) -> tuple[str, str]:
    """(key, url) of the cache entry: the key hashes every input's bytes in order (a hub dataset:
    its id and split), the options and this stage's code. Streams the files (Prefect's cache key)."""
    sources = resolve_sources(data, eval_data, options)
    hashes = [hash_parts("hub", source.url, source.hub_split) if source.hub_split else _hash_stream(source, options) for source in sources]
    return _entry(sources, hashes, options, cache_dir)


def _hash_stream(source: Source, options: DataOptions) -> str:
    digest = hashlib.sha256()
    for block in _read_chunks(source, options):
        digest.update(block)
    return digest.hexdigest()  # equals hash_bytes(read_source(...)): the stage re-keys by what it parsed


# --- reading -----------------------------------------------------------------------------------


@dataclass
class LoadedFile:
    source: Source
    rows: list[Any]
    lines: list[int] | None = None  # 1-based line of each row, where a line means something
    json_text: str | None = None  # a JSON array's text: its lines are found only when needed

    def line(self, row: int) -> int | None:
        if self.lines is None and self.json_text is not None:
            self.lines = _json_array_lines(self.json_text)
        return self.lines[row] if self.lines is not None and row < len(self.lines) else None


def _file_kind_of(url: str) -> str | None:
    name = url.rsplit("/", 1)[-1].lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    return FILE_KINDS.get("." + name.rsplit(".", 1)[-1]) if "." in name else None


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


def read_source(source: Source, options: DataOptions) -> bytes | None:
    """The file's bytes as stored (compressed or not); None for a hub dataset."""
    if source.hub_split:
        return None
    return b"".join(_read_chunks(source, options))


def _read_chunks(source: Source, options: DataOptions, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The stored bytes, never more than the store reports: a stream that does not end (a device
    behind some filesystem, a misbehaving store) fails instead of filling the memory."""
    fs, path = storage.filesystem(source.url, options.storage_options)
    size = fs.size(path)
    if size is None:
        raise DataValidationError(f"{source.name}: its store reports no size, so it cannot be read safely; copy it to a local file first")
    left = size + 1  # one byte past the reported size tells a longer stream
    with fsspec.open(source.url, "rb", **options.storage_options) as handle:
        while left and (block := handle.read(min(chunk, left))):
            left -= len(block)
            yield block
    if not left:
        raise DataValidationError(
            f"{source.name}: holds more than the {size} bytes its store reports (still being written, or not a plain file); "
            "run again once it is complete"
        )


def _decompress(url: str, raw: bytes) -> bytes:
    compression = next((name for suffix, name in COMPRESSIONS.items() if url.lower().endswith(suffix)), None)
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


def _jsonl_rows(text: str) -> tuple[list[Any], list[int]]:
    rows, lines = [], []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(_strict_loads(line))
        except json.JSONDecodeError as exc:
            raise FileProblem(_jsonl_error(text, number, exc)) from exc
        except _Refused as exc:
            raise FileProblem(f"row {len(rows)} (0-based), line {number}: {exc}") from exc
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


# --- checking ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowFailure:
    file: str
    row: int  # 0-based, in the file
    line: int | None
    column: str
    check: str
    reason: str

    def message(self) -> str:
        line = f", line {self.line}" if self.line else ""
        return f"{self.file} row {self.row} (0-based){line}, column '{self.column}': {self.reason}"


@dataclass
class CheckedFile:
    loaded: LoadedFile
    format: str
    frame: pd.DataFrame
    failures: list[RowFailure] = field(default_factory=list)


def check_file(loaded: LoadedFile, options: DataOptions) -> CheckedFile:
    """Run the format's pandera schema on every row of one file (lazily: every failure at once)."""
    objects = {row: value for row, value in enumerate(loaded.rows) if isinstance(value, dict)}
    if not objects:
        raise FileProblem(f"rows must be objects with named fields, row 0 is a {type(loaded.rows[0]).__name__}")
    frame = _rename(_frame(objects), options.column_mapping)
    format_name = options.format if options.format != "auto" else _detect(frame)
    not_objects = [
        _failure(loaded, row, "(row)", "not_an_object", f"expected an object with named fields, got {type(value).__name__}")
        for row, value in enumerate(loaded.rows)
        if row not in objects
    ]
    failures = not_objects + _schema_failures(loaded, frame, format_name, options)
    # Row order; within a row, the column checks before the whole-row length check.
    failures.sort(key=lambda failure: (failure.row, failure.check == data_schema.TOO_LONG))
    return CheckedFile(loaded, format_name, frame, failures)


def _frame(objects: dict[int, dict[str, Any]]) -> pd.DataFrame:
    """One column per key (first-seen order), None where a row lacks the key: pandas would fill in
    NaN, which could not be told from a float NaN that a Parquet file really holds."""
    columns = dict.fromkeys(key for record in objects.values() for key in record)
    values = {column: [record.get(column) for record in objects.values()] for column in columns}
    return pd.DataFrame(values, index=list(objects), columns=list(columns), dtype=object)


def _rename(frame: pd.DataFrame, mapping: dict[str, str]) -> pd.DataFrame:
    clashes = [f"{old!r} -> {new!r}" for old, new in mapping.items() if old != new and {old, new} <= set(frame.columns)]
    if clashes:
        raise FileProblem(f"column_mapping {', '.join(clashes)}: the file already has a column by the new name")
    return frame.rename(columns=mapping)


def _detect(frame: pd.DataFrame) -> str:
    detected = data_schema.detect_format(frame.columns)
    if detected is None:
        expected = "; ".join(f"{' + '.join(record.required)} ({name})" for name, record in data_schema.FORMATS.items())
        raise FileProblem(
            f"cannot tell the format from the columns {sorted(map(str, frame.columns))}; expected {expected}. "
            "Set data_options.format, or rename columns with data_options.column_mapping"
        )
    return detected


@functools.lru_cache(maxsize=16)
def _schema(format_name: str, max_chars: int) -> pa.DataFrameSchema:
    return data_schema.record_schema(format_name, max_chars)


def _schema_failures(loaded: LoadedFile, frame: pd.DataFrame, format_name: str, options: DataOptions) -> list[RowFailure]:
    try:
        _schema(format_name, options.max_chars).validate(frame, lazy=True)
        return []
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    file_wide = cases[cases["index"].isna()]
    if len(file_wide):
        raise FileProblem(_file_wide_message(file_wide, frame, format_name))
    record = data_schema.FORMATS[format_name]
    lengths = data_schema.row_chars(frame, record)
    failures: dict[tuple[int, str, str], RowFailure] = {}
    for case in cases.itertuples(index=False):
        row, check = int(case.index), str(case.check)
        if check == data_schema.TOO_LONG:
            column, value = "+".join(c for c in record.columns if c in frame.columns), int(lengths[row])
        else:
            column, value = str(case.column), frame.at[row, case.column]
        reason = data_schema.explain(format_name, column, check, value, options.max_chars)
        failures.setdefault((row, column, check), _failure(loaded, row, column, REASONS.get(check, check), reason))
    return list(failures.values())


def _file_wide_message(cases: pd.DataFrame, frame: pd.DataFrame, format_name: str) -> str:
    missing = cases[cases["check"] == data_schema.MISSING_COLUMN]["failure_case"].tolist()
    if not missing:
        return "; ".join(f"{case.column}: {case.check}: {case.failure_case}" for case in cases.itertuples())
    required = ", ".join(data_schema.FORMATS[format_name].required)
    return (
        f"missing column(s) {', '.join(map(repr, missing))}: the {format_name} format needs {required}; "
        f"the file has {sorted(map(str, frame.columns))}. Rename columns with data_options.column_mapping"
    )


def _failure(loaded: LoadedFile, row: int, column: str, check: str, reason: str) -> RowFailure:
    return RowFailure(loaded.source.name, row, loaded.line(row), column, check, reason)


# --- canonical rows ----------------------------------------------------------------------------


@dataclass
class Row:
    messages: list[dict[str, str]]
    split: str
    source: str

    @functools.cached_property
    def canonical(self) -> str:
        return json.dumps(self.messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def fraction(self) -> float:
        """Where the row's content hash falls in [0, 1): the same text always lands the same."""
        return int(hashlib.sha256(self.canonical.encode("utf-8")).hexdigest()[:8], 16) / 16**8

    @property
    def chars(self) -> int:
        return sum(len(message["content"]) for message in self.messages)

    def as_json(self) -> str:
        record = {"messages": self.messages, "split": self.split, "source": self.source}
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def to_messages(record: dict[str, Any], format_name: str) -> list[dict[str, str]]:
    """One validated record in its format -> the canonical list of {role, content}."""
    turns = data_schema.FORMATS[format_name].turns
    if turns is not None:
        column = data_schema.FORMATS[format_name].required[0]
        return [{"role": turns.roles[turn[turns.role_key]], "content": turn[turns.content_key]} for turn in record[column]]
    if format_name == "prompt_completion":
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    prompt, extra, system = record["instruction"], record.get("input"), record.get("system")
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


def canonical_rows(checked: CheckedFile) -> list[Row]:
    bad = {failure.row for failure in checked.failures}
    source = checked.loaded.source
    return [
        Row(to_messages(record, checked.format), source.split, f"{source.name}:{row}")
        for row, record in zip(checked.frame.index, checked.frame.to_dict("records"))
        if row not in bad
    ]


def find_duplicates(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(duplicate, first occurrence) for every row whose messages equal an earlier row's."""
    first: dict[str, Row] = {}
    return [(row, first[row.canonical]) for row in rows if first.setdefault(row.canonical, row) is not row]


def eval_in_train(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(eval row, training row) for every eval row whose messages are also a training row's: the
    eval loss on it measures memorisation. A hash split never does this; eval files can."""
    trained: dict[str, Row] = {}
    for row in rows:
        if row.split == "train":
            trained.setdefault(row.canonical, row)
    return [(row, trained[row.canonical]) for row in rows if row.split == "eval" and row.canonical in trained]


def hash_split(fractions: list[float], eval_fraction: float) -> list[bool]:
    """Which rows are held out: those whose content hash falls under eval_fraction, with at least
    one eval row (the smallest hash) and one train row whenever there are two rows or more."""
    if len(fractions) < 2:
        return [False] * len(fractions)
    held = [fraction < eval_fraction for fraction in fractions]
    if eval_fraction > 0 and not any(held):
        held = [fraction == min(fractions) for fraction in fractions]
    if all(held):
        held = [fraction < max(fractions) for fraction in fractions]
    if eval_fraction > 0 and not any(held):
        held[-1] = True  # every row has the same text: no split can keep them apart
    return held


# --- the stage ---------------------------------------------------------------------------------


def validate_data(data: list[str], eval_data: list[str], options: DataOptions, cache_dir: str) -> DataArtifact:
    """Read, check and canonicalise the data; publish data.jsonl + report.json under its key."""
    sources = resolve_sources(data, eval_data, options)
    # Each file is read once: the key hashes exactly the bytes that are parsed, so a file that
    # changes during the run can never be stored under its old content's key.
    raws = [read_source(source, options) for source in sources]
    key, url = _entry(sources, [_source_hash(source, raw) for source, raw in zip(sources, raws)], options, cache_dir)
    if storage.is_complete(url):
        return _artifact(url, storage.read_json(storage.join(url, "report.json")), store_hit=True)
    checked = _check_all(sources, raws, options, cache_dir, key)
    rows = [row for file in checked for row in canonical_rows(file)]
    duplicates = find_duplicates(rows)
    if options.dedupe:
        dropped = {id(duplicate) for duplicate, _ in duplicates}
        rows = [row for row in rows if id(row) not in dropped]
    _assign_splits(rows, options, has_eval_files=any(source.split == "eval" for source in sources))
    overlap = eval_in_train(rows)
    _warn_overlap(overlap, rows)
    report = _report(key, checked, rows, duplicates, overlap, options)
    if not report["train_rows"]:
        raise DataValidationError(
            f"no training rows left: {report['rows_read']} read, dropped {report['dropped_by_reason']} (inputs: {', '.join(data)})"
        )
    return _publish(url, rows, report)


def _check_all(sources: list[Source], raws: list[bytes | None], options: DataOptions, cache_dir: str, key: str) -> list[CheckedFile]:
    """Every file parsed and checked; raises once, naming every bad file and (policy 'fail') row."""
    checked, problems = [], []
    for i, source in enumerate(sources):
        raw, raws[i] = raws[i], None  # each file's bytes are dropped once its rows are parsed
        try:
            checked.append(check_file(load_source(source, raw), options))
        except FileProblem as exc:
            problems.append(f"{source.name}: {exc}")
    failures = [failure for file in checked for failure in file.failures]
    if problems or (failures and options.on_invalid == "fail"):
        rejected = failures if options.on_invalid == "fail" else []
        raise DataValidationError(_error_message(problems, rejected, _failure_report(key, checked, problems, rejected, cache_dir)))
    return checked


def _failure_report(key: str, checked: list[CheckedFile], problems: list[str], failures: list[RowFailure], cache_dir: str) -> str | None:
    if not failures:
        return None
    url = storage.join(cache_dir, "validation-reports", f"{key}.json")
    storage.write_json_atomic(url, {
        "key": key,
        "status": "failed",
        "files": _file_summaries(checked),
        "file_problems": problems,
        "invalid_rows": [vars(failure) for failure in failures],
    })
    return url


def _error_message(problems: list[str], failures: list[RowFailure], report_url: str | None) -> str:
    lines = list(problems)
    if failures:
        bad_rows = len({(failure.file, failure.row) for failure in failures})
        lines.append(f"{bad_rows} invalid row(s), {len(failures)} failure(s) (on_invalid='fail'); full list: {report_url}")
        lines += [f"  {failure.message()}" for failure in failures[:MESSAGE_ROWS]]
        if len(failures) > MESSAGE_ROWS:
            lines.append(f"  ... and {len(failures) - MESSAGE_ROWS} more in {report_url}")
    return "\n".join(lines)


def _warn_overlap(overlap: list[tuple[Row, Row]], rows: list[Row]) -> None:
    if not overlap:
        return
    files = sorted({row.source.rsplit(":", 1)[0] for row, _ in overlap})
    logger.warning(
        "%d of %d eval row(s) are also training rows (same messages), from %s: the eval loss on them measures memorisation. "
        "Remove them from the eval data, or set data_options.dedupe to drop them (report.json lists them under eval_rows_in_train_rows)",
        len(overlap), sum(row.split == "eval" for row in rows), ", ".join(files),
    )


def _assign_splits(rows: list[Row], options: DataOptions, has_eval_files: bool) -> None:
    if has_eval_files:
        return  # rows already carry their source's split
    for row, held_out in zip(rows, hash_split([row.fraction for row in rows], options.eval_fraction)):
        row.split = "eval" if held_out else "train"


# --- report and publication --------------------------------------------------------------------


def _file_summaries(checked: list[CheckedFile]) -> list[dict[str, Any]]:
    return [
        {"file": file.loaded.source.name, "split": file.loaded.source.split, "format": file.format, "rows": len(file.loaded.rows)}
        for file in checked
    ]


def _dropped_by_reason(checked: list[CheckedFile]) -> dict[str, int]:
    """Each dropped row counted once, under its first failure."""
    counts: dict[str, int] = {}
    for file in checked:
        first: dict[int, str] = {}
        for failure in file.failures:
            first.setdefault(failure.row, failure.check)
        for reason in first.values():
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def _chars(rows: list[Row]) -> dict[str, float]:
    lengths = sorted(row.chars for row in rows)
    if not lengths:
        return {}
    return {
        "min": lengths[0],
        "max": lengths[-1],
        "mean": round(statistics.fmean(lengths), 1),
        "median": statistics.median(lengths),
        "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "total": sum(lengths),
    }


def _report(
    key: str, checked: list[CheckedFile], rows: list[Row], duplicates: list[tuple[Row, Row]], overlap: list[tuple[Row, Row]], options: DataOptions
) -> dict[str, Any]:
    dropped = _dropped_by_reason(checked)
    if options.dedupe and duplicates:
        dropped["duplicate"] = len(duplicates)
    return {
        "stage": STAGE,
        "key": key,
        "code_version": CODE_VERSION,
        "files": _file_summaries(checked),
        "rows_read": sum(len(file.loaded.rows) for file in checked),
        "rows_kept": len(rows),
        "train_rows": sum(row.split == "train" for row in rows),
        "eval_rows": sum(row.split == "eval" for row in rows),
        "eval_rows_in_train": len(overlap),
        "eval_rows_in_train_rows": [{"row": row.source, "same_as": trained.source} for row, trained in overlap],
        "rows_dropped": sum(dropped.values()),
        "dropped_by_reason": dropped,
        "duplicates": len(duplicates),
        "duplicates_dropped": options.dedupe,
        "duplicate_rows": [{"row": duplicate.source, "same_as": original.source} for duplicate, original in duplicates],
        "invalid_rows": [vars(failure) for file in checked for failure in file.failures],
        "chars": _chars(rows),
        "split_rule": "eval_data files" if any(f.loaded.source.split == "eval" for f in checked) else f"content hash < eval_fraction={options.eval_fraction}",
        "options": options.model_dump(mode="json", exclude={"storage_options"}),
    }


def _publish(url: str, rows: list[Row], report: dict[str, Any]) -> DataArtifact:
    payload = "".join(row.as_json() + "\n" for row in rows).encode("utf-8")
    # The key downstream stages cache on covers what they read (text and split), not the
    # `source` labels: renaming or moving a data file must not invalidate tokenization.
    report["content_key"] = hash_bytes("".join(f"{row.split}\t{row.canonical}\n" for row in rows).encode("utf-8"))
    with storage.atomic_directory(url) as scratch:
        (scratch / "data.jsonl").write_bytes(payload)
        (scratch / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("validated %s rows (%s train, %s eval), dropped %s", report["rows_kept"], report["train_rows"], report["eval_rows"], report["rows_dropped"])
    return _artifact(url, report, store_hit=False)


def _artifact(url: str, report: dict[str, Any], store_hit: bool) -> DataArtifact:
    return DataArtifact(
        stage=STAGE,
        uri=storage.join(url, "data.jsonl"),
        key=report["content_key"],
        report_uri=storage.join(url, "report.json"),
        stats={name: report[name] for name in STAT_FIELDS},
        store_hit=store_hit,
    )


# --- Prefect -----------------------------------------------------------------------------------


def report_table(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The artifact's stats as rows of a Prefect table (nested counts flattened)."""
    rows = []
    for name, value in stats.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        rows += [{"measure": f"{name}.{part}" if part else name, "value": item} for part, item in items]
    return rows


@publisher("validation report")
def publish_validation_table(artifact: DataArtifact) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(table=report_table(artifact.stats), key="validation-report", description=f"Validation report: {artifact.report_uri}")


@task(
    name=STAGE,
    cache_key_fn=content_cache_key(validate_entry),
    persist_result=True,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[2, 10],
)
def validate_task(data: list[str], eval_data: list[str], options: DataOptions, cache_dir: str) -> DataArtifact:
    artifact = validate_data(data, eval_data, options, cache_dir)
    entry_url = artifact.uri.rsplit("/", 1)[0]  # <cache_dir>/validated/<key>/data.jsonl
    ensure_record_matches(entry_url.rsplit("/", 1)[-1], entry_url)
    publish_validation_table(artifact)
    return artifact
