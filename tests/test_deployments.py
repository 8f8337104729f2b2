"""Deployments against a real Prefect server (tests/server.py): `deployments/prefect.yaml` deployed
with `prefect deploy`, a run started with the UI's own REST call and executed by `prefect worker`,
artifacts read back through the API, invalid parameters refused, the GPU limit honoured, the
`python -m deployments.serve` entry, and the stage cache across scheduled runs."""

from __future__ import annotations

import contextlib

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from deployments.serve import build_deployments, load_deployment_specs
from flows.cli import _walk_fields
from schemas.config import SFTConfig
from tests.server import ARTIFACT_KEYS, PREFECT_FILE, WORK_POOL, PrefectServer, wait_for

pytest_plugins = ["tests.server"]

STAGES = ("validate-data", "import-model", "tokenize-and-cache", "train", "evaluate", "export")


def _schema_descriptions(schema: dict) -> set[str]:
    return {prop["description"] for definition in schema["definitions"].values() for prop in definition["properties"].values() if "description" in prop}


# --- no server needed ---------------------------------------------------------------------------

def test_prefect_yaml_has_a_scheduled_and_a_manual_deployment_with_valid_parameters():
    specs = {spec["name"]: spec for spec in load_deployment_specs()}
    assert set(specs) == {"scheduled-retraining", "manual", "list-releases", "promote-release", "rollback-release"}
    scheduled = specs["scheduled-retraining"]
    assert [s["cron"] for s in scheduled["schedules"]] == ["0 3 * * *"]
    config = SFTConfig.model_validate(scheduled["parameters"]["config"])
    assert config.data[0].startswith("file://") and config.output.startswith("file://")
    assert config.export.promote == "auto" and config.export.keep_releases == 7
    assert not specs["manual"]["schedules"]
    assert all(spec["work_pool"]["name"] == WORK_POOL for spec in specs.values())
    assert {spec["entrypoint"] for spec in specs.values()} == {
        "flows/sft.py:sft", "flows/releases.py:list_releases", "flows/releases.py:promote_release", "flows/releases.py:rollback_release"}
    # The release operations run against the nightly deployment's release root.
    assert specs["promote-release"]["parameters"]["output"] == specs["rollback-release"]["parameters"]["output"] == config.output


def test_serve_builds_the_deployments_of_prefect_yaml():
    specs = load_deployment_specs()
    served = {deployment.name: deployment for deployment in build_deployments(specs)}
    assert set(served) == {spec["name"] for spec in specs}
    for spec in specs:
        deployment = served[spec["name"]]
        assert deployment.parameters == spec["parameters"]
        assert [s.schedule.cron for s in deployment.schedules] == [s["cron"] for s in spec["schedules"]]
        assert deployment.enforce_parameter_schema
        assert deployment.work_pool_name is None  # served from this process
    assert served["scheduled-retraining"].concurrency_limit == 1
    assert [d.name for d in build_deployments(specs, only=["manual"])] == ["manual"]
    with pytest.raises(ValueError, match="no such deployment"):
        build_deployments(specs, only=["nightly"])


@pytest.mark.parametrize("variant", ["docker", "kubernetes"])
def test_docker_and_kubernetes_variants_deploy_the_same_flow_with_valid_configs(variant):
    specs = load_deployment_specs(PREFECT_FILE.parent / variant / "prefect.yaml")
    assert {"scheduled-retraining", "manual"} <= {spec["name"] for spec in specs}
    for spec in specs:
        assert spec["entrypoint"] == "flows/sft.py:sft"
        SFTConfig.model_validate(spec["parameters"]["config"])


def test_kubernetes_job_template_declares_every_variable_it_uses():
    from prefect.utilities.templating import find_placeholders

    template = json.loads((PREFECT_FILE.parent / "kubernetes" / "base-job-template.json").read_text())
    declared = set(template["variables"]["properties"])
    used = {placeholder.name for placeholder in find_placeholders(template["job_configuration"])}
    assert used == declared
    for spec in load_deployment_specs(PREFECT_FILE.parent / "kubernetes" / "prefect.yaml"):
        assert set(spec["work_pool"]["job_variables"]) <= declared
        gpus = spec["work_pool"]["job_variables"]["gpu_count"]
        assert SFTConfig.model_validate(spec["parameters"]["config"]).train.devices in (1, gpus)


# --- against the server -------------------------------------------------------------------------

@pytest.mark.slow
def test_deploy_creates_both_deployments_with_the_typed_config_form(deployments):
    scheduled, manual = deployments["scheduled-retraining"], deployments["manual"]
    assert [s["schedule"]["cron"] for s in scheduled["schedules"] if s["active"]] == ["0 3 * * *"]
    assert scheduled["parameters"]["config"]["output"] == "file:///srv/sft/releases/nightly"
    assert scheduled["global_concurrency_limit"]["limit"] == 1
    assert manual["schedules"] == []
    for deployment in deployments.values():
        assert deployment["work_pool_name"] == WORK_POOL
        assert deployment["enforce_parameter_schema"] is True
        # The run form is generated from this schema: every field with its description and default.
        schema = deployment["parameter_openapi_schema"]
        assert schema["properties"]["config"]["default"] == SFTConfig().model_dump(mode="json")
        assert {info.description for _, _, info in _walk_fields(SFTConfig)} <= _schema_descriptions(schema)
        assert schema["definitions"]["TemplateOptions"]["properties"]["max_length"]["minimum"] == 8


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad",
    [
        {"train": {"method": "qlora"}},  # not one of the choices
        {"train": {"max_steps": 0}},  # below the bound
        {"template": {"max_length": "lots"}},  # not a number
        {"trian": {"max_steps": 3}},  # no such field
    ],
    ids=["choice", "bound", "type", "unknown-field"],
)
def test_server_rejects_invalid_parameters_before_a_run_starts(prefect_server: PrefectServer, deployments, bad):
    deployment_id = deployments["manual"]["id"]
    runs_filter = {"deployments": {"id": {"any_": [deployment_id]}}}
    before = prefect_server.api("POST", "/flow_runs/count", json=runs_filter).json()
    response = prefect_server.api("POST", f"/deployments/{deployment_id}/create_flow_run", json={"parameters": {"config": bad}})
    assert 400 <= response.status_code < 500, response.text
    assert "Validation failed" in response.text
    assert prefect_server.api("POST", "/flow_runs/count", json=runs_filter).json() == before


@pytest.mark.slow
def test_ui_triggered_run_completes_on_the_worker_and_publishes_artifacts(prefect_server: PrefectServer, ui_run):
    flow_run = ui_run["flow_run"]
    assert flow_run["state_type"] == "COMPLETED", prefect_server.run_logs(flow_run["id"])
    assert flow_run["parameters"]["config"] == ui_run["config"]

    artifacts = prefect_server.api("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}).json()
    by_key = {artifact["key"]: artifact for artifact in artifacts if artifact["key"]}
    assert ARTIFACT_KEYS <= set(by_key), sorted(by_key)
    assert by_key["sft-eval-metrics"]["type"] == "table"
    assert ui_run["config"]["output"] in by_key["sft-release"]["data"]
    assert [a["data"] for a in artifacts if a["type"] == "progress"] == [100.0]

    manifest = ui_run["manifest"]
    assert manifest["status"] == "completed" and manifest["flow_run_id"] == flow_run["id"]
    assert set(manifest["stages"]) == set(STAGES)
    assert {stage["cache"] for stage in manifest["stages"].values()} == {"miss"}


@pytest.mark.slow
def test_gpu_stages_wait_for_the_gpu_concurrency_limit(prefect_server: PrefectServer, ui_run):
    """While the test held the only `gpu` slot, train stayed pending; it ran once the slot was freed."""
    assert ui_run["train_state_while_gpu_held"] == "PENDING"
    task_runs = prefect_server.api("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [ui_run["flow_run"]["id"]]}}}).json()
    tagged = {run["name"].rsplit("-", 1)[0] for run in task_runs if "gpu" in run["tags"]}
    assert tagged == {"train", "evaluate"}
    limit = prefect_server.api("GET", "/v2/concurrency_limits/tag:gpu").json()
    assert limit["limit"] == 1 and limit["active_slots"] == 0


@pytest.mark.slow
def test_second_scheduled_run_is_all_cache_hits_and_a_changed_byte_reruns_downstream(prefect_server: PrefectServer, ui_run):
    """Continues the UI run's history in-process against the same server: the same config again,
    then the same config after one byte of the data file changed."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.sft import sft

    config = SFTConfig.model_validate(ui_run["config"])

    def run() -> tuple[dict[str, str], float]:
        started = time.monotonic()
        with temporary_settings({PREFECT_API_URL: prefect_server.api_url}), concurrency_services_of_this_server():
            manifest = sft(config)
        assert json.loads(Path(manifest["manifest_uri"]).read_text())["stages"] == manifest["stages"]
        return {stage: entry["cache"] for stage, entry in manifest["stages"].items()}, time.monotonic() - started

    unchanged, wall_s = run()
    assert unchanged == dict.fromkeys(STAGES, "hit")
    assert wall_s < 60

    data = Path(config.data[0])
    text = data.read_text()
    data.write_text(text.replace("Paris.", "Paris!", 1))  # one byte of one row
    assert len(data.read_bytes()) == len(text.encode()) and data.read_text() != text
    changed, _ = run()
    assert changed == {
        "validate-data": "miss", "import-model": "hit", "tokenize-and-cache": "miss",
        "train": "miss", "evaluate": "miss", "export": "miss",
    }


@pytest.mark.slow
def test_serve_entry_registers_the_deployments_with_their_schedule(prefect_server: PrefectServer, tmp_path):
    """`python -m deployments.serve` against the server. It reads a copy of prefect.yaml whose
    deployments are renamed, so the worker's deployments of the other tests stay untouched."""
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    for deployment in spec["deployments"]:
        deployment["name"] += "-served"
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec))

    serve = prefect_server.background(
        [sys.executable, "-m", "deployments.serve", "--prefect-file", str(prefect_file)], "serve"
    )
    try:
        def registered() -> list[dict] | None:
            assert serve.alive(), serve.tail()
            responses = [prefect_server.api("GET", f"/deployments/name/sft/{name}-served") for name in ("scheduled-retraining", "manual")]
            return [r.json() for r in responses] if all(r.status_code == 200 for r in responses) else None

        scheduled, manual = wait_for(registered, 300, "serve to register its deployments", interval=2, on_timeout=serve.tail)
        assert [s["schedule"]["cron"] for s in scheduled["schedules"]] == ["0 3 * * *"]
        assert scheduled["parameters"] == spec["deployments"][0]["parameters"]
        assert scheduled["work_pool_name"] is None and manual["work_pool_name"] is None
        assert wait_for(lambda: prefect_server.deployment("sft", "manual-served")["status"] == "READY", 60, "serve's heartbeat")
    finally:
        serve.stop()


@contextlib.contextmanager
def concurrency_services_of_this_server():
    """Prefect acquires tag concurrency slots through one service per set of tags and process,
    bound to the API it first talked to. Stop it after these in-process runs, or later flows of
    this test session (on the harness's server) would queue for the `gpu` slot of this one."""
    from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService

    try:
        yield
    finally:
        ConcurrencySlotAcquisitionWithLeaseService.drain_all(timeout=30)
