"""Content hashes. Every cache key in the project is built here, from bytes and values, never from
a path string, so moving a file keeps its key and changing one byte changes it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import fsspec


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(value: Any) -> str:
    """Hash of a JSON-able value, independent of dict order (pydantic models are dumped first)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hash_bytes(text.encode("utf-8"))


def hash_url(url: str, storage_options: dict[str, Any] | None = None, chunk: int = 1 << 20) -> str:
    """Hash of a file's bytes, read through fsspec."""
    digest = hashlib.sha256()
    with fsspec.open(url, "rb", **(storage_options or {})) as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths: Iterable[str | Path], root: str | Path | None = None) -> str:
    """Hash of several files' names (relative to root) and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        name = str(path.relative_to(root)) if root is not None else path.name
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(hash_url(str(path)).encode("ascii"))
    return digest.hexdigest()


def hash_parts(*parts: Any) -> str:
    """Combine already-computed hashes and plain values into one key."""
    return hash_json(list(parts))


def code_version(*modules: Any) -> str:
    """Hash of the source files of the given modules: the 'code version' part of a cache key, so
    editing a stage's logic invalidates what it cached."""
    digest = hashlib.sha256()
    for module in modules:
        source = Path(module.__file__).read_bytes()
        digest.update(module.__name__.encode("utf-8") + b"\0" + source)
    return digest.hexdigest()[:16]
