"""Scheduled retraining that never ships a regression, on the tiny model and a real (temporary)
Prefect server: the first release goes to production, a better model replaces it, a worse one is
rejected (production unchanged byte for byte, the run's state and artifacts say so), then
rollback and promote by command and by the Prefect flows. The release store's own rules
(history as a stack, retention, pointers) are tested without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows import releases as release_cli
from flows.sft import sft
from tasks.core import storage
from tasks.releases import ReleaseError, ReleaseStore
from tests.conftest import ALPACA_ROWS
from tests.test_flow import tiny_config

SCRAMBLED = [{**row, "output": " ".join(reversed(row["output"].split()))} for row in ALPACA_ROWS]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run(model_dir: Path, tmp: Path, rows: list[dict], steps: int, learning_rate: float, max_regression: float | None, mlflow: str):
    data = tmp / f"data-{steps}-{learning_rate}.json"
    data.write_text(json.dumps(rows * 4))
    config = tiny_config(
        model_dir, data, tmp, eval_data=[str(tmp / "held_out.json")],
        train={"max_steps": steps, "micro_batch_size": 4, "learning_rate": learning_rate, "checkpoint_every": 50},
        eval={"num_generate": 2, "max_new_tokens": 4, "gate": {"max_regression": max_regression}},
        tracking={"mlflow_uri": mlflow, "experiment": "nightly", "registered_model": "nightly"},
    )
    return config, sft(config, return_state=True)


@pytest.fixture(scope="module")
def three_runs(prefect_harness, mlflow_server, tiny_model_dir, tmp_path_factory):
    """(1) the first release; (2) a better model (longer training); (3) a worse one: a tiny learning
    rate on scrambled answers. Held-out rows are training rows, so more training means lower loss."""
    tmp = tmp_path_factory.mktemp("releases")
    (tmp / "held_out.json").write_text(json.dumps(ALPACA_ROWS[:3]))
    first = run(tiny_model_dir, tmp, ALPACA_ROWS, steps=3, learning_rate=1e-3, max_regression=None, mlflow=mlflow_server)
    second = run(tiny_model_dir, tmp, ALPACA_ROWS, steps=24, learning_rate=3e-3, max_regression=0.0, mlflow=mlflow_server)
    root = Path(first[0].output)
    store = ReleaseStore(str(root))
    production_before = snapshot(Path(store.release_url(store.production())))
    third = run(tiny_model_dir, tmp, SCRAMBLED, steps=2, learning_rate=1e-6, max_regression=0.0, mlflow=mlflow_server)
    return root, [first, second, third], production_before


def release_of(state) -> dict:
    return state.result()["stages"]["export"]["stats"]


def test_first_release_goes_to_production_and_a_better_one_replaces_it(three_runs):
    root, runs, _ = three_runs
    store = ReleaseStore(str(root))
    (_, first), (_, second) = runs[0], runs[1]
    assert first.name == second.name == "Completed"
    one, two = release_of(first), release_of(second)
    assert one["decision"] == two["decision"] == "promoted"
    assert [entry["production"] for entry in store.history()] == [one["release"], two["release"]]
    comparison = second.result()["stages"]["evaluate"]["stats"]["comparison"]
    assert comparison["champion"] == f"champion {one['release']}" and comparison["decision"] == "promote"
    assert comparison["challenger_value"] <= comparison["champion_value"]
    manifest = json.loads((Path(store.release_url(two["release"])) / "run_manifest.json").read_text())
    assert manifest["release"]["evaluated_against"]["name"] == one["release"]
    assert manifest["release"]["comparison"] == comparison


def test_a_worse_model_is_rejected_and_production_is_untouched(three_runs):
    root, runs, production_before = three_runs
    store = ReleaseStore(str(root))
    _, state = runs[2]
    manifest = state.result()
    assert state.name == "Rejected" and state.is_completed() and manifest["status"] == "rejected"
    assert "not promoted" in state.message and "eval_loss" in state.message
    two, three = release_of(runs[1][1]), release_of(state)
    assert three["decision"] == "rejected" and store.production() == two["release"] == store.latest()
    assert snapshot(Path(store.release_url(two["release"]))) == production_before
    rejected = store.info(three["release"])
    assert rejected.status == "rejected" and rejected.metrics["decision"] == "reject"
    assert rejected.metrics["challenger_value"] > rejected.metrics["champion_value"]
    card = (Path(rejected.url) / "README.md").read_text()
    assert "FAILED" in card and "Champion vs challenger" in card and f"champion {two['release']}" in card
    assert "Champion vs challenger" in (Path(rejected.url) / "eval" / "report.md").read_text()


def test_the_rejection_is_in_the_prefect_artifacts_with_the_numbers(three_runs):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, runs, _ = three_runs
    state = runs[2][1]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sft-decision", "sft-champion-vs-challenger"])))
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert flow_run.state.name == "Rejected"
    mine = {artifact.key: artifact for artifact in found if artifact.flow_run_id == flow_run.id}
    assert "Rejected: not promoted" in mine["sft-decision"].data and "eval_loss" in mine["sft-decision"].data
    assert "champion" in json.dumps(mine["sft-champion-vs-challenger"].data)


def test_each_run_is_tracked_in_mlflow_and_the_champion_alias_follows_production(three_runs, mlflow_server):
    from mlflow.tracking import MlflowClient

    root, runs, _ = three_runs
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = client.get_experiment_by_name("nightly")
    tracked = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)
    assert len(tracked) == 3 and [r.data.tags["decision"] for r in tracked] == ["promoted", "promoted", "rejected"]
    assert [r.info.status for r in tracked] == ["FINISHED"] * 3
    second = tracked[1]
    assert second.data.params["train.max_steps"] == "24" and second.data.params["eval.gate.max_regression"] == "0.0"
    history = client.get_metric_history(second.info.run_id, "train_loss")
    assert [point.step for point in history] == list(range(1, 25))
    assert {"challenger.eval_loss", "champion.eval_loss", "base.eval_loss"} <= set(second.data.metrics)
    assert "README.md" in {a.path for a in client.list_artifacts(second.info.run_id)}
    versions = client.search_model_versions("name = 'nightly'")
    assert len(versions) == 2  # the rejected candidate is not registered
    champion = client.get_model_version_by_alias("nightly", "champion")
    assert champion.tags["release"] == ReleaseStore(str(root)).production() == release_of(runs[1][1])["release"]


def test_rollback_and_promote_by_command_and_by_prefect_flow(three_runs, capsys):
    from prefect import get_client

    root, runs, _ = three_runs
    store = ReleaseStore(str(root))
    one, two, three = (release_of(state)["release"] for _, state in runs)
    assert release_cli.main(["list", "--output", str(root)]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in (one, two, three)) and "rejected" in listing and "production" in listing
    assert release_cli.main(["rollback", "--output", str(root)]) == 0 and store.production() == one
    assert release_cli.main(["promote", two, "--output", str(root)]) == 0 and store.production() == two
    assert release_cli.main(["path", "--output", str(root)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"releases/{two}")

    assert [row["release"] for row in release_cli.list_releases(str(root))] == [three, two, one]
    state = release_cli.rollback_release(str(root), return_state=True)
    assert state.is_completed() and store.production() == one
    state = release_cli.promote_release(str(root), two, return_state=True)
    assert state.is_completed() and store.production() == two
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).state.is_completed()
    assert [entry["action"] for entry in store.history()] == ["promote", "promote", "rollback", "promote", "rollback", "promote"]
    assert release_cli.main(["promote", "no-such-release", "--output", str(root)]) == 1


# --- the store alone -------------------------------------------------------------------------------


def fake_release(store: ReleaseStore, name: str, passed: bool = True) -> None:
    folder = Path(store.release_url(name))
    folder.mkdir(parents=True)
    (folder / "run_manifest.json").write_text(json.dumps({"release": {"key": name[-12:] * 2, "gate": {"passed": passed}}}))
    (folder / storage.COMPLETE_MARKER).write_text("ok\n")


NAMES = [f"20261203T0{hour}0000Z-{hour:012x}" for hour in range(1, 8)]


def test_history_is_a_stack_and_retention_keeps_what_the_pointers_need(tmp_path):
    store = ReleaseStore(str(tmp_path))
    for name in NAMES:
        fake_release(store, name)
    with pytest.raises(ReleaseError, match="nothing to roll back"):
        store.rollback()
    for name in NAMES[:3]:
        store.promote(name)
    assert store.rollback()["production"] == NAMES[1] and store.rollback()["production"] == NAMES[0]
    with pytest.raises(ReleaseError, match="nothing to roll back"):
        store.rollback()
    store.set_latest(NAMES[2])
    deleted = store.prune(keep=2)
    assert store.names() == [NAMES[0], NAMES[2], NAMES[5], NAMES[6]]  # production and LATEST stay
    assert deleted == [NAMES[1], NAMES[3], NAMES[4]]
    with pytest.raises(ReleaseError, match="no complete release"):
        store.promote(NAMES[1])
    (Path(store.release_url(NAMES[6])) / storage.COMPLETE_MARKER).unlink()  # a half-written release
    with pytest.raises(ReleaseError, match="no complete release"):
        store.promote(NAMES[6])


def test_the_cli_exits_3_on_a_rejection_and_a_rerun_is_all_cache_hits(three_runs, capsys):
    from flows.sft import EXIT_REJECTED, main

    root, runs, _ = three_runs
    config = runs[2][0]
    args = ["--config", str(root.parent / "rejected.yaml")]
    (root.parent / "rejected.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(args) == EXIT_REJECTED
    captured = capsys.readouterr()
    assert "rejected: the new model did not beat the one in production" in captured.err
    assert f"production: {ReleaseStore(str(root)).production()}" in captured.out
    records = sorted((root / "attempts").glob("*-rejected/run_manifest.json"))
    stages = json.loads(records[-1].read_text())["stages"]
    assert {entry["cache"] for entry in stages.values()} == {"hit"}
