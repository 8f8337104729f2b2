"""The whole flow on a tiny local model: export, manifest, cache hits, dry run, CLI exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.sft import main, sft
from schemas.config import SFTConfig
from tests.conftest import production
from tests.server import ARTIFACT_KEYS

REPO_ROOT = Path(__file__).resolve().parent.parent
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


def test_full_run_exports_the_model_it_trained(first_run):
    """Before: `shape == +3 or last == eos`, true of almost any model. Now: the release is the base
    model plus the adapter that train wrote, logit for logit and token for token."""
    from peft import PeftModel

    config, manifest = first_run
    assert manifest["status"] == "completed"
    release = AutoModelForCausalLM.from_pretrained(production(config.output), use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(production(config.output))
    base = AutoModelForCausalLM.from_pretrained(config.model, use_safetensors=True)
    tuned = PeftModel.from_pretrained(base, str(Path(manifest["stages"]["train"]["uri"]) / "adapter")).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(release(**prompt).logits, tuned(**prompt).logits, atol=1e-5, rtol=1e-5)
    greedy = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    generated = release.generate(**prompt, **greedy)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 3
    assert torch.equal(generated, tuned.generate(**prompt, **greedy))


def test_run_manifest_records_every_stage(first_run):
    config, manifest = first_run
    written = json.loads((production(config.output) / "run_manifest.json").read_text())
    assert list(written["stages"]) == STAGES
    for stage in STAGES:
        entry = written["stages"][stage]
        assert entry["cache"] == "miss"
        assert entry["key"] and entry["uri"] and entry["wall_s"] >= 0
    assert written["config"] == config.redacted_dump()


def test_second_run_with_nothing_changed_hits_every_cache(first_run):
    config, first = first_run
    release_manifest = (production(config.output) / "run_manifest.json").read_bytes()
    manifest = sft(config)
    cached = {stage: entry["cache"] for stage, entry in manifest["stages"].items()}
    assert cached == {stage: "hit" for stage in STAGES}
    # The release still describes the run that built it; this run is recorded beside it.
    assert (production(config.output) / "run_manifest.json").read_bytes() == release_manifest
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


# --- what --output may replace, through the command line ----------------------------------------


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("output", [".", "data", "notes.txt"])
def test_cli_refuses_an_output_that_is_not_a_release(tmp_path, monkeypatch, tiny_model_dir, capsys, output, dry_run):
    """Before: `--output .` or the data's folder was replaced by the release (the user's files
    gone, exit 0), and a regular file was swapped out for a release folder."""
    from tests.conftest import ALPACA_ROWS

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "alpaca.json").write_text(json.dumps(ALPACA_ROWS * 4))
    (work / "notes.txt").write_text("my notes")
    monkeypatch.chdir(work)
    before = tree(work)
    argv = ["--data", "data/alpaca.json", "--model", str(tiny_model_dir), "--output", output, "--cache_dir", str(tmp_path / "cache")]
    assert main(argv + (["--dry-run"] if dry_run else [])) == 1
    err = capsys.readouterr().err
    assert f"--output {output} is an existing" in err and "refusing to replace it" in err
    assert tree(work) == before
    assert not (tmp_path / "cache").exists()  # refused before any work


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None for path in root.rglob("*")}


def test_no_held_out_rows_fail_at_validation_not_after_training(prefect_harness, tmp_path, tiny_model_dir):
    from tasks.validate import DataValidationError
    from tests.conftest import ALPACA_ROWS

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(ALPACA_ROWS * 4))
    config = tiny_config(tiny_model_dir, data, tmp_path, data_options={"eval_fraction": 0.0})
    with pytest.raises(DataValidationError, match="no held-out rows"):
        sft(config)
    assert not (tmp_path / "cache" / "models").exists()  # nothing after validation ran
    records = list((tmp_path / "release" / "attempts").glob("*-failed/run_manifest.json"))
    assert len(records) == 1 and list(json.loads(records[0].read_text())["stages"]) == ["validate-data"]


# --- Ctrl-C, SIGTERM and kill -9 of the command line --------------------------------------------


class CLIRun:
    """`python -m flows.sft` in its own process group, as a terminal starts it (SIGINT at its
    default), with its own PREFECT_HOME and no configured API, so it starts its own server. Every
    process it starts inherits a marker, so the test can find any it leaves behind."""

    def __init__(self, tmp: Path, model_dir: Path):
        from tests.conftest import ALPACA_ROWS

        self.tmp, self.marker = tmp, f"sft-test-{tmp.name}"
        (tmp / "alpaca.json").write_text(json.dumps(ALPACA_ROWS * 4))
        self.argv = [sys.executable, "-m", "flows.sft", "--data", str(tmp / "alpaca.json"), "--model", str(model_dir),
                     "--output", str(tmp / "release"), "--cache_dir", str(tmp / "cache"), "--template.max_length", "128",
                     "--data_options.eval_fraction", "0.25", "--train.max_steps", "300", "--train.checkpoint_every", "10",
                     "--train.micro_batch_size", "4", "--eval.num_generate", "1", "--eval.max_new_tokens", "2",
                     "--eval.gate.max_regression", "null"]
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
        self.env.update(PREFECT_HOME=str(tmp / "prefect-home"), SFT_TEST_MARKER=self.marker)

    def start(self) -> subprocess.Popen:
        self.log = self.tmp / f"cli-{time.monotonic_ns()}.log"
        with self.log.open("w") as out:
            return subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO_ROOT,
                                    start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def wait_for(self, process: subprocess.Popen, text: str, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log.read_text():
            assert process.poll() is None, f"exited with {process.returncode} before {text!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s:\n{self.output()}"
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text()

    def leftovers(self) -> list[int]:
        """Processes still running that this run started (the Prefect server, training workers)."""
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            with contextlib.suppress(OSError):
                if f"SFT_TEST_MARKER={self.marker}".encode() in environ.read_bytes().split(b"\0"):
                    found.append(int(environ.parent.name))
        return found

    def stop(self, process: subprocess.Popen, signum: int, group: bool) -> tuple[int, float]:
        """Send `signum` (to the whole group, as a terminal's Ctrl-C does); (exit code, seconds to exit)."""
        sent = time.monotonic()
        os.killpg(process.pid, signum) if group else os.kill(process.pid, signum)
        try:
            code = process.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        return code, time.monotonic() - sent

    def attempt_records(self, status: str) -> list[dict]:
        return [json.loads(path.read_text()) for path in (self.tmp / "release" / "attempts").glob(f"*-{status}/run_manifest.json")]


def wait_until_gone(run: CLIRun, timeout_s: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := run.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.timeout(600)
def test_ctrl_c_stops_within_seconds_records_the_attempt_and_the_same_command_resumes(tmp_path, tiny_model_dir):
    """Before: Ctrl-C killed Prefect's temporary server too, and the run spent minutes retrying to
    report its crash to it (kill -9 was needed after 120 s)."""
    run = CLIRun(tmp_path, tiny_model_dir)
    process = run.start()
    run.wait_for(process, "step 20/")
    code, seconds = run.stop(process, signal.SIGINT, group=True)
    assert code == 130 and seconds < 20, run.output()
    assert run.output().rstrip().splitlines()[-1].startswith("interrupted: the run stopped (Ctrl-C)")
    [record] = run.attempt_records("interrupted")
    assert list(record["stages"]) == STAGES[:3]  # train was interrupted, and said so
    assert wait_until_gone(run) == []

    again = run.start()
    assert again.wait(timeout=400) == 0, run.output()
    manifest = json.loads((production(tmp_path / "release") / "run_manifest.json").read_text())
    assert manifest["stages"]["train"]["stats"]["resumed_from_step"] >= 10
    assert wait_until_gone(run) == []


@pytest.mark.timeout(300)
def test_sigterm_stops_the_run_with_a_message_a_record_and_no_orphaned_server(tmp_path, tiny_model_dir):
    """Before: SIGTERM (docker stop, systemd) ended the CLI without an error line and left the
    temporary Prefect server (~200 MB) running."""
    run = CLIRun(tmp_path, tiny_model_dir)
    process = run.start()
    run.wait_for(process, "step 20/")
    code, seconds = run.stop(process, signal.SIGTERM, group=False)
    assert code == 128 + signal.SIGTERM and seconds < 20, run.output()
    assert run.output().rstrip().splitlines()[-1].startswith("terminated: the run stopped (SIGTERM)")
    assert len(run.attempt_records("terminated")) == 1
    assert wait_until_gone(run) == []


@pytest.mark.timeout(300)
def test_kill_9_of_the_cli_takes_its_prefect_server_down(tmp_path, tiny_model_dir):
    run = CLIRun(tmp_path, tiny_model_dir)
    process = run.start()
    run.wait_for(process, "Beginning flow run")
    assert run.leftovers(), "the CLI should have started its own Prefect server"
    code, _ = run.stop(process, signal.SIGKILL, group=False)
    assert code == -signal.SIGKILL
    assert wait_until_gone(run) == []


# --- a cache that is reached only with its storage options --------------------------------------


def test_a_cache_behind_credentials_is_reached_with_them_by_every_stage(first_run, locked_cache, tiny_model_dir, tmp_path, capfd):
    """Before: only evaluate and export passed cache_storage_options; validate-data, import-model,
    tokenize-and-cache, train (and its checkpoints) and the flow's own checks opened the cache
    without them. This cache refuses every access without its token and records the refusals
    that a caller swallowed (a Prefect cache key, an artifact publisher, a reader that rebuilds)."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from tests.conftest import ALPACA_ROWS, LOCKED_TOKEN, LockedMemoryFileSystem, locked_bytes

    cache_dir, options = locked_cache
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(ALPACA_ROWS * 4))
    config = tiny_config(tiny_model_dir, data, tmp_path, cache_dir=cache_dir, cache_storage_options=options)
    # A remote cache keeps Prefect's default result storage: here a folder of this test's own.
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        first, again = sft(config), sft(config)  # the second one republishes the cached stages' reports
    assert LockedMemoryFileSystem.refused == [], "opened without its storage options:\n" + "\n".join(LockedMemoryFileSystem.refused)
    assert first["status"] == again["status"] == "completed"
    for stage in STAGES[:-1]:
        assert first["stages"][stage]["uri"].startswith(cache_dir), stage
    assert {entry["cache"] for entry in first["stages"].values()} == {"miss"}
    assert {entry["cache"] for entry in again["stages"].values()} == {"hit"}
    stored = locked_bytes()
    assert any(path.endswith("train_stats.json") for path in stored)
    assert not any(".checkpoints" in path for path in stored)  # one written at step 2, removed once published
    # Where the cache is and how it is reached is no part of what it holds: the same keys as a
    # local cache, and the token in no entry, manifest, stats, release file or log line.
    _, local = first_run
    assert {stage: entry["key"] for stage, entry in first["stages"].items()} == {
        stage: entry["key"] for stage, entry in local["stages"].items()
    }
    assert [path for path, content in stored.items() if LOCKED_TOKEN.encode() in content] == []
    release_files = [path for path in (tmp_path / "release").rglob("*") if path.is_file()]
    assert release_files and [path for path in release_files if LOCKED_TOKEN.encode() in path.read_bytes()] == []
    assert LOCKED_TOKEN not in json.dumps([first, again], default=str)
    assert LOCKED_TOKEN not in "".join(capfd.readouterr())
    # The CLI's closing summary reads the evaluation from the same cache.
    from flows.report import format_run_summary

    assert "Base vs tuned" in format_run_summary(first, 1.0, options)
    assert LockedMemoryFileSystem.refused == []
