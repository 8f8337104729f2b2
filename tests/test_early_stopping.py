"""Evaluation during training: the held-out loss every eval_every steps, early stopping when it
stops improving, the best checkpoint exported (or the last one), and a run killed after its best
checkpoint resuming to exactly the weights of a run that never stopped."""

from __future__ import annotations

import random
import signal

import pytest

from schemas.manifests import TokenizedArtifact
from tasks.core import storage
from tasks.train import train_model
from tests.conftest import assert_same_weights, kill_after_first_checkpoint, trained_weights
from tests.conftest import train_options as options


@pytest.fixture(scope="module")
def memorising(tmp_path_factory, tiny_base) -> TokenizedArtifact:
    """12 training examples to memorise, and held-out examples with the same prompts but other
    answers drawn from a wider range of tokens: the held-out loss falls while the model learns
    what answers look like, then rises as it memorises the training answers."""
    import datasets

    from tasks.core.collate import IGNORE_INDEX

    rng = random.Random(1)
    vocab = tiny_base.stats.get("vocab_size") or 390
    train, held_out = [], []
    for _ in range(12):
        prompt = [rng.randrange(3, vocab) for _ in range(6)]
        answer, other = [rng.randrange(3, 40) for _ in range(10)], [rng.randrange(3, 70) for _ in range(10)]
        train.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * 6 + answer, "length": 16})
        held_out.append({"input_ids": prompt + other, "labels": [IGNORE_INDEX] * 6 + other, "length": 16})
    folder = tmp_path_factory.mktemp("memorising") / "store"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "eval": datasets.Dataset.from_list(held_out)}).save_to_disk(str(folder))
    return TokenizedArtifact(stage="tokenize-and-cache", uri=str(folder), key="memorising", stats={})


def early(**changes):
    return options(max_steps=60, learning_rate=3e-2, eval_every=2, early_stopping_patience=3, checkpoint_every=100, keep_checkpoints=1,
                   **changes)


@pytest.fixture(scope="module")
def best_and_last(memorising, tiny_base, tmp_path_factory):
    cache = tmp_path_factory.mktemp("early")
    return (train_model(memorising, tiny_base, early(), str(cache / "best")),
            train_model(memorising, tiny_base, early(export_checkpoint="last"), str(cache / "last")))


def test_early_stopping_ends_a_run_whose_held_out_loss_rises(best_and_last):
    best, _ = best_and_last
    stats = best.stats
    curve = storage.read_json(best.loss_curve_uri)
    held_out = [(r["step"], r["eval_loss"]) for r in curve if "eval_loss" in r]
    assert [step for step, _ in held_out] == list(range(2, stats["steps"] + 1, 2))  # every 2 steps
    assert stats["stopped_early"]["step"] == stats["steps"] < 60 and "early stopping" in stats["stopped_early"]["reason"]
    best_loss = min(loss for _, loss in held_out)
    assert stats["best_eval_loss"] == best_loss and dict(held_out)[stats["best_step"]] == best_loss
    assert all(loss > best_loss for step, loss in held_out if step > stats["best_step"])  # none after it ties the best
    assert len([step for step, _ in held_out if step > stats["best_step"]]) == 3  # the patience
    after = [loss for step, loss in held_out if step > stats["best_step"]]
    assert after == sorted(after) and after[-1] > best_loss  # it rises


def test_best_and_last_export_different_steps_of_the_same_run(best_and_last):
    best, last = best_and_last
    assert best.stats["steps"] == last.stats["steps"] and best.stats["best_step"] == last.stats["best_step"]
    assert best.stats["exported_step"] == best.stats["best_step"] < last.stats["exported_step"] == last.stats["steps"]
    a, b = trained_weights(best), trained_weights(last)
    assert any(not a[name].equal(b[name]) for name in a)


def test_kill_9_after_the_best_checkpoint_resumes_to_the_same_exported_weights(best_and_last, memorising, tiny_base, tmp_path):
    best, _ = best_and_last
    opts = early()
    process, _, url = kill_after_first_checkpoint(memorising, tiny_base, opts, tmp_path / "crashed", progress_delay_s=0.3,
                                                  step=best.stats["best_step"])
    assert process.returncode == -signal.SIGKILL and not storage.is_complete(url)
    resumed = train_model(memorising, tiny_base, opts, str(tmp_path / "crashed"))
    assert resumed.stats["resumed_from_step"] >= best.stats["best_step"]
    for name in ("steps", "best_step", "exported_step", "stopped_early"):
        assert resumed.stats[name] == best.stats[name], name
    assert_same_weights(resumed, best, atol=1e-6)


