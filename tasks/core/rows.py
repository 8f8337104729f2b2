"""The canonical row: the one shape every input format is mapped onto, and the JSONL file of them
that validate-data writes and tokenize and evaluate read.

One object a line: {"messages": [MESSAGE, ...], "tools": [TOOL, ...], "split": "train"|"eval",
"source": "<file>:<row>"}, `tools` only when the row has tool definitions. A plain turn is exactly
{"role", "content"}; assistant turns may add "tool_calls", "reasoning" and "weight", tool turns
"tool_call_id" and "name"; a TOOL is {"type": "function", "function": {"name", "description",
"parameters"}} (the canonical-tools contract, issue 12). Which rows are held out, which repeat one
another and the key later stages cache on are all decided from the messages and tools alone, never
from `source`, so the same text lands the same way whatever its file is called.

A validated dataset is shards of such files (one per shard of the input, tasks/core/shards.py) and
a manifest: the shards in order and one byte a row saying whether it is dropped (a duplicate),
trained on or held out. `read_dataset` reads it back as rows."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import fsspec
import numpy as np

from tasks.core import storage

DIGEST_BYTES = 16
# A row's place in the dataset, one byte a row in a validated manifest's selection.
DROPPED, TRAIN, EVAL = 0, 1, 2
SPLIT_CODES = {"train": TRAIN, "eval": EVAL}
MANIFEST_FILE = "manifest.json"  # a validated dataset: its shards in order
SELECTION_FILE = "selection.npy"
SHARD_ROWS_FILE = "rows.jsonl"


@dataclass
class Row:
    messages: list[dict[str, Any]]
    split: str
    source: str
    tools: list[dict[str, Any]] = field(default_factory=list)

    @functools.cached_property
    def canonical(self) -> str:
        # A row without tools hashes its messages alone, exactly as before tools existed: the
        # content keys and hash splits of existing data do not move.
        content: Any = {"messages": self.messages, "tools": self.tools} if self.tools else self.messages
        return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def fraction(self) -> float:
        """Where the row's content hash falls in [0, 1): the same text always lands the same."""
        return int.from_bytes(self.digest[:4], "big") / 2**32

    @functools.cached_property
    def digest(self) -> bytes:
        """The first 16 bytes of the content hash: what duplicates and splits are decided on
        across shards (16 bytes a row, not the row). Its first 4 bytes give `fraction`."""
        return hashlib.sha256(self.canonical.encode("utf-8")).digest()[:DIGEST_BYTES]

    @property
    def chars(self) -> int:
        return sum(message_chars(message) for message in self.messages) + tools_chars(self.tools)

    def as_json(self) -> str:
        record: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            record["tools"] = self.tools
        record.update(split=self.split, source=self.source)
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _json_chars(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False))


def message_chars(message: dict[str, Any]) -> int:
    """Characters of text in one canonical turn: its content, reasoning and tool calls (each call's
    name and its arguments as JSON), everything that is tokenized."""
    calls = message.get("tool_calls", ())
    return (
        len(message["content"])
        + len(message.get("reasoning", ""))
        + sum(len(call["function"]["name"]) + _json_chars(call["function"]["arguments"]) for call in calls)
    )


def tools_chars(tools: list[dict[str, Any]]) -> int:
    """Characters of the tool definitions as JSON (templates render them into the prompt)."""
    return _json_chars(tools) if tools else 0


# --- the split --------------------------------------------------------------------------------


def hash_split(fractions: list[float], eval_fraction: float) -> list[bool]:
    """Which rows are held out: those whose content hash falls under eval_fraction, with at least
    one eval row (the smallest hash) and one train row whenever there are two rows or more."""
    if len(fractions) < 2:
        return [False] * len(fractions)
    low, high = min(fractions), max(fractions)
    held = [fraction < eval_fraction for fraction in fractions]
    if eval_fraction > 0 and not any(held):
        held = [fraction == low for fraction in fractions]
    if all(held):
        held = [fraction < high for fraction in fractions]
    if eval_fraction > 0 and not any(held):
        held[-1] = True  # every row has the same text: no split can keep them apart
    return held


# --- the JSONL file ----------------------------------------------------------------------------


def write_canonical(path: Path, rows: list[Row]) -> None:
    """One row a line, in order, to a local file (the stage publishes its folder atomically)."""
    path.write_bytes("".join(row.as_json() + "\n" for row in rows).encode("utf-8"))


def read_canonical(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of a canonical JSONL file, in file order, as plain dicts. A generator: a reader that
    needs only the first few rows stops reading there."""
    with fsspec.open(url, "r", encoding="utf-8", **(storage_options or {})) as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


# --- a validated dataset: shards and a selection -----------------------------------------------


def digest_fractions(digests: np.ndarray) -> np.ndarray:
    """`Row.fraction` of every row, from the digests (their first 4 bytes, big-endian)."""
    head = np.frombuffer(digests.tobytes(), dtype=">u4").reshape(len(digests), DIGEST_BYTES // 4)[:, 0]
    return head.astype(np.float64) / 2**32


def shard_url(cache_root: str, shard_key: str) -> str:
    """The entry of one validated shard (validate-data writes it, tokenize reads its rows)."""
    return storage.join(cache_root, "validated-shards", shard_key)


def dataset_url(cache_root: str, key: str) -> str:
    """The entry of a validated dataset: its manifest, selection and report."""
    return storage.join(cache_root, "validated", key)


def shard_rows_url(cache_root: str, shard_key: str) -> str:
    return storage.join(shard_url(cache_root, shard_key), SHARD_ROWS_FILE)


def manifest_cache_root(manifest_url: str) -> str:
    """<cache_dir> of dataset_url(<cache_dir>, key)/manifest.json."""
    return manifest_url.rsplit("/", 3)[0]


def read_selection(manifest_url: str, storage_options: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(the manifest's shards in order: {key, rows}; every valid row's DROPPED/TRAIN/EVAL code)."""
    manifest = storage.read_json(manifest_url, storage_options)
    with fsspec.open(manifest_url.rsplit("/", 1)[0] + "/" + SELECTION_FILE, "rb", **(storage_options or {})) as handle:
        selection = np.load(handle)
    return manifest["shards"], selection


def read_dataset(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of a validated dataset in order, each with its split, dropped rows left out. `url`
    is a validated manifest, or a single canonical JSONL file (its rows' own splits)."""
    if not url.endswith("/" + MANIFEST_FILE):
        yield from read_canonical(url, storage_options)
        return
    shards, selection = read_selection(url, storage_options)
    root, offset, names = manifest_cache_root(url), 0, {code: name for name, code in SPLIT_CODES.items()}
    for shard in shards:
        codes = selection[offset : offset + shard["rows"]]
        offset += shard["rows"]
        for row, code in zip(read_canonical(shard_rows_url(root, shard["key"]), storage_options), codes):
            if code != DROPPED:
                row["split"] = names[int(code)]
                yield row
