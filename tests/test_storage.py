"""storage: atomic publication, and the scratch a killed writer leaves behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core import storage

REPO_ROOT = Path(__file__).resolve().parent.parent


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_scratch_of_a_writer_killed_by_sigkill_is_removed_by_the_next_writer(tmp_path):
    target = tmp_path / "release"
    script = (
        "import time\n"
        "from tasks.core import storage\n"
        f"with storage.atomic_directory({str(target)!r}) as scratch:\n"
        "    (scratch / 'weights.bin').write_bytes(b'x' * 1_000_000)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(120)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert writer.stdout.readline().strip() == "ready"
    writer.kill()
    writer.wait()
    assert [path.name.startswith(".release.tmp-") for path in tmp_path.iterdir()] == [True]

    with storage.atomic_directory(str(target)) as scratch:
        (scratch / "model.txt").write_text("new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["release"]
    assert (target / "model.txt").read_text() == "new"


def test_scratch_of_a_live_writer_is_left_alone(tmp_path):
    live = tmp_path / f".release.tmp-{__import__('os').getpid()}-abcd"
    live.mkdir()
    legacy = tmp_path / ".release.tmp-k2j4h5"  # older versions named no writer: unknown, kept
    legacy.mkdir()
    with storage.atomic_directory(str(tmp_path / "release")) as scratch:
        (scratch / "a").write_text("a")
    assert live.is_dir() and legacy.is_dir()


def test_a_previous_entry_retired_by_a_killed_swap_is_put_back(tmp_path):
    """kill -9 between the two renames of a swap: the retired folder is the only copy left."""
    retired = tmp_path / f".release.old-{dead_pid()}-1234abcd"
    retired.mkdir()
    (retired / "model.txt").write_text("previous")
    storage.remove_stale_scratch(tmp_path / "release")
    assert (tmp_path / "release" / "model.txt").read_text() == "previous"
    assert not retired.exists()


def test_a_retired_entry_is_deleted_once_its_replacement_is_in_place(tmp_path):
    (tmp_path / "release").mkdir()
    retired = tmp_path / f".release.old-{dead_pid()}-1234abcd"
    retired.mkdir()
    assert storage.remove_stale_scratch(tmp_path / "release") == [retired]
    assert not retired.exists()


def test_a_regular_file_is_never_swapped_out(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(storage.RefusedTargetError, match="is a file"):
        with storage.atomic_directory(str(target)) as scratch:
            (scratch / "a").write_text("a")
    assert target.read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_atomic_directory_publishes_with_its_marker_on_memory_urls():
    url = "memory://storage-test/entry"
    with storage.atomic_directory(url) as scratch:
        (scratch / "a.txt").write_text("a")
    assert storage.is_complete(url)
    assert storage.read_text(storage.join(url, "a.txt")) == "a"
