"""tracking: a run's config, curve, scores, files and releases in a real MLflow tracking server
(`mlflow server` on a free loopback port, SQLite backend, artifacts proxied over HTTP), read back
through MLflow's own client. No mocks: a server that is down is a port where nothing listens."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytest

from schemas.config import SFTConfig, TrackingOptions
from tasks import reporting, tracking
from tests.conftest import HAS_MLFLOW
from tests.server import free_port

needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install -e '.[test]')")


def training_curve(steps: int = 12, resumed_at: int = 0) -> list[dict]:
    """Records as tasks/core/trainer.py writes them: cumulative tokens and training seconds."""
    return [
        {"step": s, "loss": 2.5 / s, "lr": 1e-3 * min(1.0, s / 3), "grad_norm": 1.0 / s,
         "tokens": 512 * s, "loss_tokens": 200 * s, "elapsed_s": round(0.25 * s, 4)}
        for s in range(resumed_at + 1, steps + 1)
    ]


def release_folder(root: Path, name: str) -> Path:
    """A release's shape: card, manifest and configs at the top, curve and eval below, big weights."""
    folder = root / "releases" / name
    (folder / "training").mkdir(parents=True)
    (folder / "eval").mkdir()
    (folder / "README.md").write_text(f"# {name}\n")
    (folder / "run_manifest.json").write_text(json.dumps({"release": {"name": name}}))
    (folder / "config.yaml").write_text("train:\n  learning_rate: 0.0002\n")
    (folder / "training" / "loss_curve.json").write_text(json.dumps(training_curve()))
    (folder / "eval" / "metrics.json").write_text(json.dumps({"eval_loss": 1.2}))
    with (folder / "model.safetensors").open("wb") as weights:  # sparse: larger than SMALL_FILE_BYTES, no disk
        weights.truncate(tracking.SMALL_FILE_BYTES + 1)
    return folder


@pytest.fixture(autouse=True)
def own_environment(monkeypatch):
    """No tracking URI from the machine, and the HTTP limits the module sets restored afterwards."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, value in tracking.HTTP_LIMITS.items():
        monkeypatch.setenv(name, value)


def client(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


@pytest.mark.slow
@needs_mlflow
def test_a_run_and_its_release_read_back_through_mlflow(mlflow_server, tmp_path):
    options = TrackingOptions(mlflow_uri=mlflow_server, experiment="sft-roundtrip", registered_model="sft-roundtrip")
    config = SFTConfig(train={"learning_rate": 2e-4, "max_steps": 12}, template={"system_prompt_mode": "custom", "system_prompt": "x" * 7000})
    tracker = tracking.start_run(options, "roundtrip", config.redacted_dump(), {"flow_run_id": "abc"})
    assert tracker is not None and tracker.url.endswith(f"/runs/{tracker.run_id}")

    tracker.log_training(training_curve())
    scores = {"base": {"eval_loss": 2.0, "perplexity": math.exp(2.0), "token_f1": float("nan"), "num_generated": 2, "note": "text"},
              "champion": {"eval_loss": 1.5}, "challenger": {"eval_loss": 1.25, "perplexity": float("inf")}}
    tracker.log_evaluation(scores)
    plot, card = tmp_path / "loss_curve.png", tmp_path / "README.md"
    reporting.plot_loss_curve(training_curve(), plot)
    card.write_text("# model card\n")
    tracker.log_files([plot, card, tmp_path / "missing.json"])
    release = release_folder(tmp_path, "20260101-000000-abcd")
    version = tracker.register_release(str(release), promoted=True)
    tracker.end("completed")
    assert tracker.active is False

    mlflow = client(mlflow_server)
    run = mlflow.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed" and run.data.tags["flow_run_id"] == "abc"
    params = run.data.params
    assert params["train.learning_rate"] == "0.0002" and params["train.max_steps"] == "12"
    assert params["train.lora.r"] == str(config.train.lora.r)
    assert json.loads(params["data"]) == config.data and params["tracking.registered_model"] == "prefect-sft"
    long_prompt = params["template.system_prompt"]
    assert len(long_prompt) == tracking.MAX_PARAM_VALUE and long_prompt.endswith(tracking.TRUNCATED)
    assert len(params) == len(tracking.flat_params(config.redacted_dump())) > tracking.PARAMS_PER_BATCH / 2

    losses = mlflow.get_metric_history(tracker.run_id, "train_loss")
    assert [(m.step, m.value) for m in sorted(losses, key=lambda m: m.step)] == [(s, pytest.approx(2.5 / s)) for s in range(1, 13)]
    assert {m.step: m.value for m in mlflow.get_metric_history(tracker.run_id, "learning_rate")}[1] == pytest.approx(1e-3 / 3)
    assert {round(m.value) for m in mlflow.get_metric_history(tracker.run_id, "tokens_per_s")} == {2048}  # 512 tokens / 0.25 s
    assert len(mlflow.get_metric_history(tracker.run_id, "grad_norm")) == 12
    metrics = run.data.metrics
    assert metrics["base.eval_loss"] == 2.0 and metrics["champion.eval_loss"] == 1.5 and metrics["challenger.eval_loss"] == 1.25
    assert metrics["base.num_generated"] == 2
    assert not {"base.token_f1", "base.note", "challenger.perplexity"} & metrics.keys()

    assert {a.path for a in mlflow.list_artifacts(tracker.run_id)} == {"loss_curve.png", "README.md", "release"}
    released = {a.path for a in mlflow.list_artifacts(tracker.run_id, "release")}
    assert {"release/README.md", "release/run_manifest.json", "release/config.yaml", "release/training", "release/eval"} == released
    assert [a.path for a in mlflow.list_artifacts(tracker.run_id, "release/training")] == ["release/training/loss_curve.json"]
    downloaded = Path(mlflow.download_artifacts(tracker.run_id, "README.md", str(tmp_path / "back")))
    assert downloaded.read_text() == "# model card\n"

    champion = mlflow.get_model_version_by_alias("sft-roundtrip", tracking.CHAMPION)
    assert champion.version == version == "1" and champion.run_id == tracker.run_id
    assert champion.source == f"runs:/{tracker.run_id}/release"
    assert champion.tags == {"release": release.name, "release_uri": str(release.resolve())}


@pytest.mark.slow
@needs_mlflow
def test_a_challenger_waits_and_the_champion_alias_moves_on_promote_and_rollback(mlflow_server, tmp_path):
    options = TrackingOptions(mlflow_uri=mlflow_server, experiment="sft-aliases", registered_model="sft-aliases")
    first, second = release_folder(tmp_path, "release-1"), release_folder(tmp_path, "release-2")
    for folder, promoted, status in ((first, True, "completed"), (second, False, "rejected")):
        tracker = tracking.start_run(options, folder.name, {"output": str(tmp_path)}, {})
        tracker.register_release(folder.as_uri(), promoted=promoted)  # file:// URIs are local folders too
        assert tracker.register_release(str(folder), promoted=promoted) is not None  # a second call finds the version
        tracker.end(status)
    mlflow = client(mlflow_server)
    assert len(mlflow.search_model_versions("name = 'sft-aliases'")) == 2
    assert mlflow.get_model_version_by_alias("sft-aliases", "champion").tags["release"] == "release-1"
    rejected = mlflow.get_run(tracker.run_id)
    assert rejected.info.status == "FINISHED" and rejected.data.tags["decision"] == "rejected"

    assert tracking.set_champion(options, "release-2") == "2"  # manual promote
    assert mlflow.get_model_version_by_alias("sft-aliases", "champion").version == "2"
    assert tracking.set_champion(options, "release-1") == "1"  # rollback
    assert mlflow.get_model_version_by_alias("sft-aliases", "champion").version == "1"
    assert tracking.set_champion(options, "never-registered") is None


@pytest.mark.slow
@needs_mlflow
def test_an_mlflow_error_is_one_warning_and_the_run_still_ends(mlflow_server, caplog):
    tracker = tracking.start_run(TrackingOptions(mlflow_uri=mlflow_server, experiment="sft-errors"), "errors", {"seed": 1}, {})
    with caplog.at_level(logging.WARNING, logger="tasks.tracking"):
        tracker.log_params({"seed": 2})  # MLflow refuses to change a logged param
        tracker.log_training(training_curve())
        tracker.end("failed")
    assert [r.levelname for r in caplog.records if r.name == "tasks.tracking"] == ["WARNING"]
    assert tracker.active is False
    run = client(mlflow_server).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and "train_loss" not in run.data.metrics


def test_a_server_that_is_down_is_one_warning_within_seconds(caplog):
    options = TrackingOptions(mlflow_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert tracking.start_run(options, "nobody-home", {"a": 1}, {}) is None
    assert time.monotonic() - started < 10
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "tasks.tracking"
    assert ("did not answer" if HAS_MLFLOW else "not installed") in warnings[0].getMessage()


def test_tracking_is_off_without_an_option_or_the_environment(caplog, monkeypatch):
    with caplog.at_level(logging.DEBUG, logger="tasks.tracking"):
        assert tracking.start_run(TrackingOptions(), "off", {"a": 1}, {}) is None
        assert tracking.set_champion(TrackingOptions(), "release-1") is None
    assert tracking.tracking_uri(TrackingOptions()) is None and not caplog.records
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri(TrackingOptions()) == "http://tracking.example:5000"
    assert tracking.tracking_uri(TrackingOptions(mlflow_uri="http://ours:5000")) == "http://ours:5000"  # the option wins


def test_only_rank_zero_tracks(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert tracking.start_run(TrackingOptions(mlflow_uri=f"http://127.0.0.1:{free_port()}"), "worker", {}, {}) is None


def test_tokens_per_second_come_from_the_cumulative_counts_also_after_a_resume():
    curve = training_curve(steps=6)
    curve[3:] = [{**r, "elapsed_s": r["elapsed_s"] + 1.0} for r in curve[3:]]  # step 4 took 1.25 s
    points = tracking.curve_metrics(curve[:2] + curve[3:])  # a resumed curve as written
    rates = [(step, value) for key, value, step in points if key == "tokens_per_s"]
    assert rates == [(1, 2048.0), (2, 2048.0), (4, 1024 / 1.5), (5, 2048.0), (6, 2048.0)]
    assert {key for key, _, _ in tracking.curve_metrics([{"step": 1, "loss": float("nan"), "lr": 1e-3}])} == {"learning_rate"}


def test_params_are_dotted_valid_keys_with_text_values():
    flat = tracking.flat_params({"train": {"lora": {"r": 8, "target_modules": ["q_proj"]}, "learning_rate": None},
                                 "data_options": {"storage_options": {}, "column_mapping": {"what?": "instruction"}}})
    assert flat == {"train.lora.r": "8", "train.lora.target_modules": '["q_proj"]', "train.learning_rate": "null",
                    "data_options.storage_options": "{}", "data_options.column_mapping.what_": "instruction"}
