"""fsspec storage with atomic publication.

Every artifact is written under a temporary sibling name and moved into place only when complete;
a `_COMPLETE` marker written last lets readers tell a finished entry from a half-written one even
on object stores, where a "directory" move is a copy."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

COMPLETE_MARKER = "_COMPLETE"


class RefusedTargetError(ValueError):
    """A write would replace something that is not ours to replace; no retry can change that."""


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url, **(storage_options or {}))


def is_local(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, _ = filesystem(url, storage_options)
    return isinstance(fs, LocalFileSystem)


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def is_complete(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """True when a directory artifact was fully published (its marker exists)."""
    return exists(join(url, COMPLETE_MARKER), storage_options)


def size(url: str, storage_options: dict[str, Any] | None = None) -> int:
    fs, path = filesystem(url, storage_options)
    return fs.size(path) or 0


def read_text(url: str, storage_options: dict[str, Any] | None = None) -> str:
    with fsspec.open(url, "r", encoding="utf-8", **(storage_options or {})) as handle:
        return handle.read()


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    return json.loads(read_text(url, storage_options))


def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(temporary, "wb") as handle:
        handle.write(data)
    fs.mv(temporary, path)


def write_text_atomic(url: str, text: str, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes_atomic(url, text.encode("utf-8"), storage_options)


def write_json_atomic(url: str, value: Any, storage_options: dict[str, Any] | None = None) -> None:
    write_text_atomic(url, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n", storage_options)


@contextlib.contextmanager
def atomic_directory(url: str, storage_options: dict[str, Any] | None = None, replace: bool = True) -> Iterator[Path]:
    """Yield a local scratch folder; on success publish it at `url` with a completion marker.

    On a local filesystem the folder is built as a hidden sibling and renamed into place (the old
    entry, if any, is swapped out and deleted only afterwards). Elsewhere it is uploaded under a
    temporary name, moved, and the marker is written last. On error nothing is published and the
    previous entry is left intact. Scratch left by a process that was killed (kill -9, power loss)
    is removed by the next writer of the same entry."""
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(target)
        scratch = Path(tempfile.mkdtemp(prefix=f"{_scratch_prefix(target, 'tmp')}{os.getpid()}-", dir=target.parent))
        try:
            yield scratch
            (scratch / COMPLETE_MARKER).write_text("ok\n")
            apply_umask(scratch)
            _swap_into_place(scratch, target, replace)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    scratch = Path(tempfile.mkdtemp(prefix="sft-publish-"))
    try:
        yield scratch
        _publish_remote(fs, scratch, path, replace)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def current_umask() -> int:
    """The process umask, read without setting it: os.umask can only read it by changing it, and
    for that moment every file another thread creates would get the wrong mode."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o077)  # no /proc (macOS): the brief change errs on the private side
    os.umask(umask)
    return umask


def apply_umask(root: Path) -> None:
    """Give a published tree the permissions the user's umask gives new files, as save_pretrained
    does: scratch folders (mkdtemp, 0700) and temporary files (0600) would otherwise keep a model
    server running as another user (an Ollama or vLLM service account) out."""
    umask = current_umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _scratch_prefix(target: Path, kind: str) -> str:
    """Hidden siblings of `target`: `.name.tmp-<pid>-*` while building, `.name.old-<pid>-*` while
    swapping. The pid says whether the writer is still alive."""
    return f".{target.name}.{kind}-"


def remove_stale_scratch(target: Path, name: str | None = None) -> list[Path]:
    """Delete the scratch siblings of `target` whose writing process is gone; returns them. With
    name="*": those of every entry in the folder `target` (checkpoints prune theirs this way).

    A retired previous entry (`.old-`) whose writer died between the two renames of a swap is the
    only copy of that entry: it is put back when nothing took its place."""
    folder, name = (target, name) if name else (target.parent, target.name)
    removed = []
    for kind in ("tmp", "old"):
        for sibling in folder.glob(f".{name}.{kind}-*"):
            entry, _, suffix = sibling.name[1:].rpartition(f".{kind}-")
            if not sibling.is_dir() or _writer_alive(suffix):
                continue
            if kind == "old" and not (folder / entry).exists():
                os.replace(sibling, folder / entry)
                continue
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def _writer_alive(suffix: str) -> bool:
    """Whether the process named in a scratch suffix (`<pid>-<random>`) runs on this machine.
    Scratch without a pid (written by older versions) is left alone: its writer is unknown."""
    pid = suffix.split("-", 1)[0]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _swap_into_place(scratch: Path, target: Path, replace: bool) -> None:
    if target.exists() and not target.is_dir():
        raise RefusedTargetError(f"{target} is a file, not a folder: refusing to replace it")
    if target.exists():
        if not replace:
            return  # another writer finished the same content-addressed entry first
        retired = target.with_name(f"{_scratch_prefix(target, 'old')}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, retired)
        os.replace(scratch, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        try:
            os.replace(scratch, target)
        except OSError:
            # A concurrent writer created the same entry between our check and the rename.
            if not (target / COMPLETE_MARKER).exists():
                raise


def _publish_remote(fs: fsspec.AbstractFileSystem, scratch: Path, path: str, replace: bool) -> None:
    if fs.exists(path):
        if not replace and fs.exists(f"{path}/{COMPLETE_MARKER}"):
            return
    staging = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fs.put(str(scratch), staging, recursive=True)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.mv(staging, path, recursive=True)
    with fs.open(f"{path}/{COMPLETE_MARKER}", "wb") as handle:
        handle.write(b"ok\n")


def local_copy(url: str, storage_options: dict[str, Any] | None = None) -> Path:
    """A local path for a directory artifact: the path itself on local disk, else a cached download
    (libraries like transformers and safetensors read local files)."""
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return Path(path)
    cache_root = Path(os.environ.get("SFT_LOCAL_CACHE", Path(tempfile.gettempdir()) / "prefect-sft-downloads"))
    local = cache_root / path.strip("/").replace("/", "__")
    if not (local / COMPLETE_MARKER).exists():
        cache_root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_root))
        fs.get(path.rstrip("/") + "/", str(scratch), recursive=True)
        (scratch / COMPLETE_MARKER).write_text("ok\n")
        _swap_into_place(scratch, local, replace=True)
    return local
