"""Checkpoints: which ones count, which are kept, and a run killed with SIGKILL resuming to the
weights of a run that never stopped."""

from __future__ import annotations

import os
import signal
import pytest

from tasks.core import storage
from tasks.core.checkpoints import Checkpoints, unique_tensors
from tasks.train import checkpoint_url, train_entry, train_model
from tests.conftest import LockedMemoryFileSystem, assert_same_weights, kill_after_first_checkpoint, locked_bytes
from tests.conftest import train_options as options
from tests.test_storage import dead_pid


def publish(ckpts: Checkpoints, step: int) -> None:
    with storage.atomic_directory(ckpts.folder(step)) as scratch:
        (scratch / "progress.json").write_text("{}")


def test_only_complete_checkpoints_count_and_the_newest_are_kept(tmp_path):
    ckpts = Checkpoints(str(tmp_path / "ckpt"), keep=2)
    assert ckpts.complete_steps() == []
    for step in (2, 4, 6):
        publish(ckpts, step)
    # What a save killed mid-write leaves: a hidden scratch folder whose writer is gone, beside one
    # whose writer (this process) is still at work.
    abandoned = tmp_path / "ckpt" / f".step-00000008.tmp-{dead_pid()}-a"
    writing = tmp_path / "ckpt" / f".step-00000008.tmp-{os.getpid()}-b"
    abandoned.mkdir()
    writing.mkdir()
    assert ckpts.complete_steps() == [2, 4, 6]
    ckpts.prune()
    assert ckpts.complete_steps() == [4, 6]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [writing.name, "step-00000004", "step-00000006"]
    ckpts.remove_all()
    assert not (tmp_path / "ckpt").exists() and ckpts.complete_steps() == []


def test_unique_tensors_drops_the_tied_alias(tiny_model_dir):
    """The tiny Llama ties lm_head to the embeddings; safetensors refuses two names for one tensor."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    state = dict(model.named_parameters(remove_duplicate=False))
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    unique = unique_tensors(state, model)
    assert set(state) - set(unique) == {"lm_head.weight"}


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_base, tiny_tokenized, tmp_path):
    opts = options(max_steps=8, checkpoint_every=2, keep_checkpoints=2)
    crashed_cache = tmp_path / "crashed"
    # Slowed by its progress callback, so the kill lands well before the end.
    process, _, url = kill_after_first_checkpoint(tiny_tokenized, tiny_base, opts, crashed_cache, progress_delay_s=0.4)
    assert process.returncode == -signal.SIGKILL and not storage.is_complete(url)

    resumed = train_model(tiny_tokenized, tiny_base, opts, str(crashed_cache))
    assert resumed.stats["resumed_from_step"] in (2, 4, 6) and resumed.stats["steps"] == 8
    curve = storage.read_json(resumed.loss_curve_uri)
    assert [r["step"] for r in curve] == list(range(1, 9))  # the killed run's steps come from the checkpoint
    uninterrupted = train_model(tiny_tokenized, tiny_base, opts, str(tmp_path / "clean"))
    assert uninterrupted.stats["resumed_from_step"] == 0
    assert [r["loss"] for r in curve] == pytest.approx([r["loss"] for r in storage.read_json(uninterrupted.loss_curve_uri)], rel=1e-6)
    assert_same_weights(resumed, uninterrupted, atol=1e-6)
    assert not storage.exists(checkpoint_url(str(crashed_cache), resumed.key))  # removed once published


class Stop(Exception):
    """Raised by a progress callback: the run stops as a crash would, its checkpoints in place."""


def test_checkpoints_in_a_cache_behind_credentials_are_written_read_and_removed_with_them(tiny_base, tiny_tokenized, locked_cache):
    cache_dir, cache_options = locked_cache
    opts = options(max_steps=4, checkpoint_every=2)

    def stop_at_step_3(event: dict) -> None:
        if event.get("event") == "step" and event["step"] == 3:
            raise Stop

    with pytest.raises(Stop):
        train_model(tiny_tokenized, tiny_base, opts, cache_dir, progress=stop_at_step_3, cache_storage_options=cache_options)
    key, url = train_entry(tiny_tokenized, tiny_base, opts, cache_dir)
    assert Checkpoints(checkpoint_url(cache_dir, key), 2, cache_options).complete_steps() == [2]
    resumed = train_model(tiny_tokenized, tiny_base, opts, cache_dir, cache_storage_options=cache_options)
    assert resumed.uri == url and resumed.stats["resumed_from_step"] == 2 and resumed.stats["steps"] == 4
    assert [r["step"] for r in storage.read_json(resumed.loss_curve_uri, cache_options)] == [1, 2, 3, 4]
    assert not any(".checkpoints" in path for path in locked_bytes())  # removed once the weights were published
    assert LockedMemoryFileSystem.refused == []
