"""The release root at `output`: versioned releases, the `production` pointer, LATEST and history.

    <output>/
      releases/<UTC time>-<key>/   one self-describing release each (written atomically, never changed)
      production                   the name of the release in service (a small text file)
      LATEST                       the name of the newest release that passed its gate
      history.jsonl                every move of `production`: promote, rollback, with time and reason
      attempts/                    records of runs that built no release (dry runs, failures)

A release is written completely before any pointer names it, and a pointer is replaced atomically
(written aside, then renamed), so a crash at any moment leaves `production` naming a complete
release. `production` moves only by `promote` and `rollback`, each appended to history.jsonl:
rollback returns to the release that was in production before the current one was promoted.
Retention keeps the newest `keep` releases and never deletes the ones the pointers name."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tasks.core import storage

logger = logging.getLogger(__name__)

RELEASES = "releases"
PRODUCTION = "production"
LATEST = "LATEST"
HISTORY = "history.jsonl"
ATTEMPTS = "attempts"
MANIFEST = "run_manifest.json"
ROOT_ENTRIES = {RELEASES, PRODUCTION, LATEST, HISTORY, ATTEMPTS}
RELEASE_NAME = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{12}$")
KEY_CHARS = 12


class ReleaseError(ValueError):
    """A release operation that cannot be done (unknown release, nothing to roll back to)."""


@dataclass(frozen=True)
class ReleaseInfo:
    name: str
    url: str
    key: str
    passed: bool
    exported_at: str
    trained_key: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    gate_message: str = ""
    evaluated_against: dict[str, Any] | None = None  # the champion it was measured against

    @property
    def status(self) -> str:
        return "passed" if self.passed else "rejected"


class ReleaseStore:
    """The release root at `url` (any fsspec URL) and the operations on it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.options = storage_options or {}

    # -- releases --------------------------------------------------------------------------------

    def release_url(self, name: str) -> str:
        return storage.join(self.url, RELEASES, name)

    @staticmethod
    def new_name(key: str) -> str:
        return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{key[:KEY_CHARS]}"

    def names(self) -> list[str]:
        """Complete releases, oldest first (names start with their UTC time)."""
        fs, path = storage.filesystem(storage.join(self.url, RELEASES), self.options)
        if not fs.exists(path):
            return []
        found = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
        return sorted(name for name in found if RELEASE_NAME.match(name) and storage.is_complete(self.release_url(name), self.options))

    def info(self, name: str) -> ReleaseInfo:
        """A release named by a user: checked to be complete (one marker read, not a listing)."""
        if not RELEASE_NAME.match(name) or not storage.is_complete(self.release_url(name), self.options):
            raise ReleaseError(f"no complete release named {name!r} under {self.url}/{RELEASES}")
        return self._read_info(name)

    def _read_info(self, name: str) -> ReleaseInfo:
        """A release that names() listed, so already known complete."""
        manifest = storage.read_json(storage.join(self.release_url(name), MANIFEST), self.options)
        release = manifest.get("release", {})
        return ReleaseInfo(
            name=name,
            url=self.release_url(name),
            key=release.get("key", ""),
            passed=bool(release.get("gate", {}).get("passed")),
            exported_at=release.get("exported_at", ""),
            trained_key=manifest.get("hashes", {}).get("trained"),
            metrics=release.get("comparison", {}),
            gate_message=release.get("gate", {}).get("message", ""),
            evaluated_against=release.get("evaluated_against"),
        )

    def find(self, key: str) -> str | None:
        """The newest complete release built from exactly these inputs (its release key)."""
        for name in reversed(self.names()):
            if name.endswith(key[:KEY_CHARS]) and self._read_info(name).key == key:
                return name
        return None

    def releases(self) -> list[ReleaseInfo]:
        return [self._read_info(name) for name in self.names()]

    # -- pointers --------------------------------------------------------------------------------

    def _read_pointer(self, name: str) -> str | None:
        url = storage.join(self.url, name)
        if not storage.exists(url, self.options):
            return None
        value = storage.read_text(url, self.options).strip()
        return value or None

    def production(self) -> str | None:
        return self._read_pointer(PRODUCTION)

    def latest(self) -> str | None:
        return self._read_pointer(LATEST)

    def set_latest(self, name: str) -> None:
        storage.write_text_atomic(storage.join(self.url, LATEST), name + "\n", self.options)

    def history(self) -> list[dict[str, Any]]:
        url = storage.join(self.url, HISTORY)
        if not storage.exists(url, self.options):
            return []
        return [json.loads(line) for line in storage.read_text(url, self.options).splitlines() if line.strip()]

    def _move_production(self, name: str, action: str, reason: str) -> dict[str, Any]:
        """Point `production` at a complete release; the history line is written first, so a crash
        between the two leaves history one step ahead, never a pointer without a record."""
        self.info(name)  # a complete release, or ReleaseError
        entry = {"at": datetime.now(timezone.utc).isoformat(), "action": action, "production": name,
                 "previous": self.production(), "reason": reason}
        lines = [json.dumps(record) for record in self.history()] + [json.dumps(entry)]
        storage.write_text_atomic(storage.join(self.url, HISTORY), "\n".join(lines) + "\n", self.options)
        storage.write_text_atomic(storage.join(self.url, PRODUCTION), name + "\n", self.options)
        logger.info("production -> %s (%s: %s)", name, action, reason)
        return entry

    def promote(self, name: str, reason: str = "promoted by hand") -> dict[str, Any]:
        """Put release `name` in production (a rejected release too, when a person says so)."""
        if name == self.production():
            raise ReleaseError(f"{name} is already in production")
        return self._move_production(name, "promote", reason)

    def rollback(self, reason: str = "rolled back by hand") -> dict[str, Any]:
        """Return production to the release it replaced (history is a stack: promote pushes,
        rollback pops)."""
        stack = self._production_stack()
        if len(stack) < 2:
            raise ReleaseError(f"nothing to roll back to: {self.url} has had {len(stack)} release(s) in production")
        return self._move_production(stack[-2], "rollback", reason)

    def _production_stack(self) -> list[str]:
        stack: list[str] = []
        for entry in self.history():
            if entry["action"] == "rollback":
                stack.pop()
            else:
                stack.append(entry["production"])
        return stack

    # -- retention -------------------------------------------------------------------------------

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` releases; the releases the pointers and the rollback
        stack name are always kept."""
        names = self.names()
        protected = {self.production(), self.latest(), *self._production_stack()[-2:]}
        doomed = [name for name in names[: max(0, len(names) - keep)] if name not in protected]
        fs, _ = storage.filesystem(self.url, self.options)
        for name in doomed:
            fs.rm(storage.filesystem(self.release_url(name), self.options)[1], recursive=True)
        return doomed

    # -- reading ---------------------------------------------------------------------------------

    def table(self) -> list[dict[str, Any]]:
        """One row a release, newest first: what `releases list` prints."""
        production, latest = self.production(), self.latest()
        rows = []
        for info in reversed(self.releases()):
            marks = [mark for mark, name in (("production", production), ("latest", latest)) if name == info.name]
            rows.append({"release": info.name, "exported_at": info.exported_at[:19], "status": info.status,
                         "pointers": ",".join(marks), **{k: info.metrics.get(k) for k in ("metric", "champion", "champion_value", "challenger_value", "decision")}})
        return rows
