"""Shards: the units that validate and tokenize work on, cache and spread over processes.

A JSON Lines file is cut into row ranges of `shard_rows` non-empty lines, found in one streaming
pass that also hashes each range's bytes: a shard is keyed by exactly the bytes it holds, so
appending rows to a file or a file to the data leaves the other shards' keys (and cache entries)
where they were. Every other input (a JSON array, CSV, Parquet, a compressed file, a Hugging Face
dataset) is one shard: those formats cannot be cut without parsing them, so memory follows the
file there. Pure: no Prefect, no pandera."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

from tasks.core import readers, storage
from tasks.core.hashing import hash_bytes, hash_parts
from tasks.core.readers import Source

UTF8_BOM = b"\xef\xbb\xbf"


class ShardChangedError(RuntimeError):
    """A shard's bytes changed between planning and reading: another attempt plans again."""


@dataclass(frozen=True)
class ShardSpec:
    source: Source
    digest: str  # sha256 of the bytes the shard holds (a hub dataset: of its id and split)
    row_start: int = 0  # the file's row number (0-based, non-empty lines) of the shard's first row
    line_start: int = 1  # the file's line number (1-based) of the shard's first line
    byte_start: int | None = None  # a row range of a JSON Lines file; None: the whole input
    byte_stop: int | None = None
    size: int = 0  # bytes the shard holds as stored (0 for a hub dataset)

    @property
    def whole(self) -> bool:
        return self.byte_start is None

    def identity(self) -> list[Any]:
        """What decides the shard's validated rows besides the options: its bytes, how its file
        type is read (by name: .csv and .tsv differ), its split and where its rows sit in the file
        (the row numbers in reports)."""
        kind = readers.file_kind_and_compression(self.source.url)
        return [self.digest, kind, self.source.split, self.row_start, self.line_start]


def plan_shards(sources: list[Source], storage_options: dict[str, Any], shard_rows: int) -> list[ShardSpec]:
    """Every input cut into shards, in input order (training files first, as given)."""
    return [shard for source in sources for shard in _plan_source(source, storage_options, shard_rows)]


def _plan_source(source: Source, storage_options: dict[str, Any], shard_rows: int) -> list[ShardSpec]:
    if source.hub_split:
        return [ShardSpec(source, hash_parts("hub", source.url, source.hub_split))]
    chunks = readers.read_chunks(source, storage_options)
    first = next(chunks, b"")
    if not _splittable(source.url, first):
        digest, size = hashlib.sha256(first), len(first)
        for block in chunks:
            digest.update(block)
            size += len(block)
        return [ShardSpec(source, digest.hexdigest(), size=size)]
    shards = list(_jsonl_ranges(source, _prepend(first, chunks), shard_rows))
    if shards:
        return shards
    raw = readers.read_source(source, storage_options)  # only blank lines: the whole file, whose reader says so
    return [ShardSpec(source, hash_bytes(raw), size=len(raw))]


def _splittable(url: str, first: bytes) -> bool:
    """Uncompressed JSON Lines (by name, and by its first byte: .json may hold an array)."""
    kind, compression = readers.file_kind_and_compression(url)
    return kind == "json" and compression is None and first.removeprefix(UTF8_BOM).lstrip()[:1] == b"{"


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _jsonl_ranges(source: Source, chunks: Iterator[bytes], shard_rows: int) -> Iterator[ShardSpec]:
    """Cut after every `shard_rows` non-empty lines; each range's bytes hashed as they stream by."""
    position = line = row = 0  # bytes, lines and non-empty lines before the current one
    start, start_line, start_row, rows_in, digest = 0, 1, 0, 0, hashlib.sha256()
    for raw_line in _lines(chunks):
        digest.update(raw_line)
        position, line = position + len(raw_line), line + 1
        if raw_line.strip():
            row, rows_in = row + 1, rows_in + 1
        if rows_in == shard_rows:
            yield ShardSpec(source, digest.hexdigest(), start_row, start_line, start, position, position - start)
            start, start_line, start_row, rows_in, digest = position, line + 1, row, 0, hashlib.sha256()
    if rows_in:
        yield ShardSpec(source, digest.hexdigest(), start_row, start_line, start, position, position - start)


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The stream's lines with their b"\\n" (the last one maybe without)."""
    pending = b""
    for chunk in chunks:
        parts = (pending + chunk).split(b"\n")
        pending = parts.pop()
        for part in parts:
            yield part + b"\n"
    if pending:
        yield pending


def read_shard(spec: ShardSpec, storage_options: dict[str, Any]) -> readers.LoadedFile:
    """The shard's rows, numbered as in the whole file; refuses bytes that are not those planned."""
    if spec.source.hub_split:
        return readers.load_source(spec.source, None)
    if spec.whole:
        raw = readers.read_source(spec.source, storage_options)
    else:
        fs, path = storage.filesystem(spec.source.url, storage_options)
        raw = fs.cat_file(path, start=spec.byte_start, end=spec.byte_stop)
    if hash_bytes(raw) != spec.digest:
        raise ShardChangedError(f"{spec.source.name}: changed while it was read (rows from {spec.row_start}); run again")
    if spec.whole:
        return readers.load_source(spec.source, raw)
    return readers.load_jsonl_range(spec.source, raw, spec.row_start, spec.line_start)

