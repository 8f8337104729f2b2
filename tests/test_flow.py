"""The whole flow on a tiny local model: export, manifest, cache hits, dry run, CLI exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.sft import main, sft
from schemas.config import SFTConfig
from tests.server import ARTIFACT_KEYS

STAGES = ["validate-data", "import-model", "tokenize-and-cache", "train", "evaluate", "export"]


def tiny_config(model_dir: Path, data: Path, tmp: Path, **overrides) -> SFTConfig:
    values = {
        "data": [str(data)],
        "model": str(model_dir),
        "output": str(tmp / "release"),
        "cache_dir": str(tmp / "cache"),
        "data_options": {"eval_fraction": 0.25},
        "template": {"max_length": 128},
        "train": {"max_steps": 3, "micro_batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 2},
        "eval": {"num_generate": 2, "max_new_tokens": 4, "gate": {"max_regression": None}},
    }
    values.update(overrides)
    return SFTConfig.model_validate(values)


@pytest.fixture(scope="module")
def first_run(prefect_harness, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    data = tmp / "alpaca.json"
    from tests.conftest import ALPACA_ROWS

    data.write_text(json.dumps(ALPACA_ROWS * 4))
    config = tiny_config(tiny_model_dir, data, tmp)
    return config, sft(config)


def test_full_run_exports_a_model_that_loads_and_generates(first_run):
    config, manifest = first_run
    assert manifest["status"] == "completed"
    model = AutoModelForCausalLM.from_pretrained(config.output)
    tokenizer = AutoTokenizer.from_pretrained(config.output)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 3 or generated[0, -1] == tokenizer.eos_token_id
    assert torch.isfinite(model(**prompt).logits).all()


def test_run_manifest_records_every_stage(first_run):
    config, manifest = first_run
    written = json.loads((Path(config.output) / "run_manifest.json").read_text())
    assert list(written["stages"]) == STAGES
    for stage in STAGES:
        entry = written["stages"][stage]
        assert entry["cache"] == "miss"
        assert entry["key"] and entry["uri"] and entry["wall_s"] >= 0
    assert written["config"] == config.model_dump(mode="json")


def test_second_run_with_nothing_changed_hits_every_cache(first_run):
    config, first = first_run
    release_manifest = (Path(config.output) / "run_manifest.json").read_bytes()
    manifest = sft(config)
    cached = {stage: entry["cache"] for stage, entry in manifest["stages"].items()}
    assert cached == {stage: "hit" for stage in STAGES}
    # The release still describes the run that built it; this run is recorded beside it.
    assert (Path(config.output) / "run_manifest.json").read_bytes() == release_manifest
    assert manifest["flow_run_id"] != first["flow_run_id"]
    assert "/attempts/" in manifest["manifest_uri"] and manifest["status"] == "completed"
    # The cached stages' bodies did not run; the flow published their reports for this run anyway.
    assert ARTIFACT_KEYS <= artifact_keys(manifest["flow_run_id"])


def artifact_keys(flow_run_id: str) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key for artifact in artifacts if artifact.key}


def test_dry_run_prints_statistics_and_stops_before_training(first_run, tmp_path, tiny_model_dir, capsys):
    config, _ = first_run
    code = main(
        ["--dry-run", "--data", config.data[0], "--model", str(tiny_model_dir), "--output", str(tmp_path / "dry"),
         "--cache_dir", str(tmp_path / "cache"), "--data_options.eval_fraction", "0.25"]
    )
    assert code == 0
    out = capsys.readouterr().out
    for statistic in ("rows_kept", "train.tokens", "train.loss_fraction", "train.truncated", "dropped"):
        assert statistic in out
    manifests = list((tmp_path / "dry" / "attempts").glob("*-dry-run/run_manifest.json"))
    assert len(manifests) == 1
    assert list(json.loads(manifests[0].read_text())["stages"]) == STAGES[:3]
    assert not (tmp_path / "cache" / "train").exists()
    assert not (tmp_path / "dry" / "model.safetensors").exists()


def test_cli_bad_data_exits_non_zero_and_writes_nothing(prefect_harness, tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine", "output": "fine"}\n{"instruction": 3, "output": "x"}\n')
    code = main(["--data", str(bad), "--model", str(tiny_model_dir), "--output", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")])
    assert code == 1
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "instruction" in err
    assert not (tmp_path / "cache" / "tokenized").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()
