"""Stages retry what another attempt can get past, and fail at once on what it cannot."""

from __future__ import annotations

import pytest
import torch
from prefect import flow

from tasks import model as model_stage
from tasks.caching import InputsChangedError
from tasks.core.modeling import ModelSourceError
from tasks.core.storage import RefusedTargetError
from tasks.core.trainer import TrainingDivergedError, WorkerError
from tasks.retrying import is_transient
from tasks.validate import DataValidationError


@pytest.mark.parametrize("error", [
    ConnectionResetError("peer reset"), TimeoutError("read timed out"), OSError(5, "Input/output error"),
    torch.OutOfMemoryError("CUDA out of memory"), WorkerError("torchrun exited with -9", crashed=True),
    WorkerError("training worker (rank 1) failed: OutOfMemoryError: CUDA out of memory"),
    InputsChangedError("validate-data: an input changed"),
])
def test_transient_errors_are_retried(error):
    assert is_transient(error)


@pytest.mark.parametrize("error", [
    ModelSourceError("model folder ./x does not exist"), DataValidationError("bad rows"), RefusedTargetError("not a release"),
    TrainingDivergedError("loss nan"), FileNotFoundError("adapter missing"), PermissionError("read-only"),
    WorkerError("training worker (rank 0) failed: ValueError: bad option"), RecursionError(), KeyError("x"), None,
])
def test_deterministic_errors_are_not(error):
    assert not is_transient(error)


def counting(monkeypatch, failures: list[BaseException]):
    """Make the import-model stage raise `failures` one per attempt, then do its real work."""
    calls, real = [], model_stage.import_model

    def attempt(*args, **kwargs):
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return real(*args, **kwargs)

    monkeypatch.setattr(model_stage, "import_model", attempt)
    return calls


def run_stage(model: str, cache: str):
    @flow
    def one_stage():
        task = model_stage.import_model_task.with_options(retry_delay_seconds=0)
        return [task(model, cache, return_state=True)]  # in a list: a returned failed state would fail the flow

    return one_stage()[0]


def test_a_missing_model_folder_fails_on_the_first_attempt(prefect_harness, tmp_path, monkeypatch):
    """Before: 2 more attempts after the retry delays (12 to 40 s), then the same error."""
    calls = counting(monkeypatch, [])
    state = run_stage(str(tmp_path / "no-such-model"), str(tmp_path / "cache"))
    assert state.is_failed() and len(calls) == 1
    with pytest.raises(ModelSourceError, match="does not exist"):
        state.result()


def test_a_transient_failure_is_retried_until_it_succeeds(prefect_harness, tmp_path, tiny_model_dir, monkeypatch):
    calls = counting(monkeypatch, [ConnectionResetError("object store reset the connection"), TimeoutError("slow disk")])
    state = run_stage(str(tiny_model_dir), str(tmp_path / "cache"))
    assert state.is_completed() and len(calls) == 3
    assert state.result().stage == "import-model"
