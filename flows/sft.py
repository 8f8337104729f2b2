"""The fine-tuning flow: validate-data -> tokenize-and-cache -> train -> evaluate -> export.

Run it with `python -m flows.sft` (see --help), from a Prefect deployment, or from the UI's run
form; all three take the same `SFTConfig`."""

from __future__ import annotations

import os

# Defaults that make a laptop run work offline and on a loaded machine; explicit settings win.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, tags
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Completed

from flows.cli import config_from_args
from flows.report import format_dataset_stats, format_run_summary
from flows.server import api_for_cli
from schemas.config import SFTConfig
from schemas.manifests import Champion, ReleaseInputs, StageResult
from tasks import releases, reporting, tracking
from tasks.core import storage
from tasks.core.modeling import ModelSourceError
from tasks.core.storage import RefusedTargetError
from tasks.core.trainer import TrainingDivergedError
from tasks.evaluate import evaluate_task, publish_eval_artifacts
from tasks.export import check_output_target, export_task, publish_rejection
from tasks.model import import_model_task
from tasks.releases import ReleaseError, ReleaseStore
from tasks.tokenize import publish_tokenize_stats, tokenize_task
from tasks.train import train_task
from tasks.validate import DataValidationError, publish_validation_table, validate_task

# The stages that use the GPU carry this tag. With a tag concurrency limit on the server
# (`prefect concurrency-limit create gpu 1`), runs sharing a GPU take turns at them.
GPU_TAG = "gpu"

# The artifacts of each cacheable stage, published again by the flow when the stage is a cache hit:
# publish(result, cache_storage_options) (the evaluation report is read back from the cache).
REPUBLISH = {
    "validate-data": lambda result, cache_options: publish_validation_table(result),
    "tokenize-and-cache": lambda result, cache_options: publish_tokenize_stats(result),
    "evaluate": publish_eval_artifacts,
}


class RunLedger:
    """Collects per-stage facts (artifact, key, cache hit, wall time) for run_manifest.json."""

    def __init__(self, config: SFTConfig):
        self.config = config
        self.resolved = config.redacted_dump()  # once: every record and the release carry this
        self.started = datetime.now(timezone.utc)
        self.stages: dict[str, dict[str, Any]] = {}
        self.champion: Champion | None = None  # the release the new model was measured against

    def run(self, task: Any, *args: Any) -> Any:
        started = time.perf_counter()
        state = task.with_options(**_result_storage(self.config))(*args, return_state=True)
        result: StageResult = state.result()  # re-raises the stage's error after its retries
        if state.name == "Cached" and result.stage in REPUBLISH:  # the task body, which publishes them, did not run
            REPUBLISH[result.stage](result, self.config.cache_storage_options)
        self.stages[result.stage] = {
            "uri": result.uri,
            "key": result.key,
            "cache": "hit" if state.name == "Cached" or result.store_hit else "miss",
            "wall_s": round(time.perf_counter() - started, 2),
            "stats": result.stats,
        }
        return result

    def manifest(self, status: str) -> dict[str, Any]:
        return {
            "status": status,
            "flow_run_id": str(flow_run.id) if flow_run.id else None,
            "started_at": self.started.isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "config": self.resolved,
            "champion": self.champion.model_dump() if self.champion else None,
            "stages": self.stages,
        }


def _result_storage(config: SFTConfig) -> dict[str, Any]:
    """Prefect results live beside the stage cache, so caching works the same with the ephemeral
    server, a dedicated server or a fresh PREFECT_HOME. Remote cache dirs keep Prefect's default
    result storage (a server-side storage block can be configured for those)."""
    if not storage.is_local(config.cache_dir, config.cache_storage_options):
        return {}
    return {"result_storage": Path(storage.filesystem(config.cache_dir, config.cache_storage_options)[1]).resolve() / "prefect-results"}


@flow(name="sft", log_prints=True)
def sft(config: SFTConfig = SFTConfig()) -> dict[str, Any]:
    """Fine-tune `config.model` on `config.data` and publish the release at `config.output`."""
    cache, cache_options = config.cache_dir, config.cache_storage_options  # where every stage keeps its entries
    # Before any work, and before anything (even a failed run's record) is written under it.
    check_output_target(config.output, config.output_storage_options, cache, cache_options)
    ledger = RunLedger(config)
    try:
        data = ledger.run(validate_task, config.data, config.eval_data, config.data_options, cache, cache_options)
        require_eval_rows(data, config)
        model = ledger.run(import_model_task, config.model, cache, config.trust_remote_code, cache_options)
        tokenized = ledger.run(tokenize_task, data, model, config.template, cache, cache_options, config.data_options)
        if config.dry_run:
            print(format_dataset_stats(data.stats, tokenized.stats))
            return _finish(ledger, "dry-run")
        store = ReleaseStore(config.output, config.output_storage_options)
        with tags(GPU_TAG):
            trained = ledger.run(train_task, tokenized, model, config.train, cache, config.trust_remote_code, cache_options)
            ledger.champion = champion_for(store, trained.key)
            evaluation = ledger.run(
                evaluate_task, data, tokenized, model, trained, config.eval, config.template, cache,
                config.trust_remote_code, cache_options, ledger.champion, config.output_storage_options,
            )
        inputs = ReleaseInputs(model=model, data=data, tokenized=tokenized, trained=trained, evaluation=evaluation)
        exported = ledger.run(
            export_task, inputs, config.output_target, config.export, config.train, config.template,
            ledger.manifest("completed"), config.trust_remote_code, cache_options,
        )
    except BaseException as error:  # Ctrl-C and SIGTERM too: every attempt leaves its record
        _finish(ledger, _failure_status(error))
        raise
    decision = exported.stats["decision"]
    track_run(config, ledger, trained, evaluation, exported)
    if decision == "rejected":
        return rejected(ledger, exported, evaluation)
    return _finish(ledger, "completed", exported=True)


def track_run(config: SFTConfig, ledger: RunLedger, trained: StageResult, evaluation: StageResult, exported: StageResult) -> None:
    """Log the run to MLflow when tracking is configured (tasks/tracking.py): the resolved config,
    the training curve, base/champion/challenger metrics, the plots and card, and the release
    (registered; the 'champion' alias when it was promoted). Never fails the run."""
    decision = exported.stats["decision"]
    tracker = tracking.start_run(config.tracking, run_name=f"sft-{ledger.started.strftime('%Y%m%dT%H%M%SZ')}",
                                 params=ledger.resolved, tags={"decision": decision, "flow_run_id": str(flow_run.id or "")})
    if tracker is None:
        return
    tracker.log_training(reporting.read_loss_curve(trained, config.cache_storage_options))
    stats = evaluation.stats
    tracker.log_evaluation({"base": stats.get("base") or {}, "champion": stats.get("champion") or {}, "challenger": stats.get("tuned") or {}})
    release = exported.stats["release"]
    if release and storage.is_local(exported.uri, config.output_storage_options):
        folder = Path(storage.filesystem(exported.uri, config.output_storage_options)[1])
        tracker.log_files([folder / "README.md", folder / "training" / "loss_curve.png", folder / "eval" / "metrics.json"])
        if decision != "rejected":
            tracker.register_release(exported.uri, promoted=decision in ("promoted", "unchanged"), release=release)
    tracker.end("rejected" if decision == "rejected" else "completed")


def champion_for(store: ReleaseStore, trained_key: str) -> Champion | None:
    """The release a new model must beat: the one in production. When production already is this
    very model (nothing changed since it was built), the champion it was measured against then, so
    evaluation and export are the cache hits they were."""
    name = store.production()
    if name is None:
        return None
    info = store.info(name)
    if info.trained_key == trained_key:
        return Champion(**info.evaluated_against) if info.evaluated_against else None
    return Champion(name=name, url=info.url, key=info.key)


def rejected(ledger: RunLedger, exported: StageResult, evaluation: StageResult):
    """The run's end when the new model lost to the champion: a Completed state named 'Rejected'
    (in the Prefect UI, distinct from both a crash and a promotion) whose result is the manifest."""
    manifest = _finish(ledger, "rejected", exported=exported.stats["release"] is not None)
    where = exported.stats["release"] or "not written (export.keep_rejected is off)"
    message = (f"not promoted: {evaluation.gate_message}. Production still {exported.stats['production'] or 'empty'}; "
               f"the candidate release: {where}")
    print(message)
    publish_rejection(message)
    return Completed(name="Rejected", message=message, data=manifest)


def require_eval_rows(data: StageResult, config: SFTConfig) -> None:
    """The quality gate needs held-out rows: say so now rather than after training."""
    if config.eval.enabled and not data.stats.get("eval_rows"):
        raise DataValidationError(
            "no held-out rows to evaluate on: the quality gate would fail after training. Set --eval_data, raise "
            f"--data_options.eval_fraction (now {config.data_options.eval_fraction}), or turn evaluation off "
            "with --no-eval.enabled."
        )


def _failure_status(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, (TerminatedBySignal, TerminationSignal)):
        return "terminated"
    return "failed"


def _finish(ledger: RunLedger, status: str, exported: bool = False) -> dict[str, Any]:
    """Record the run. A release this run wrote already holds its manifest; export adds its own
    timing to it. Other runs (dry, failed, or one that found the same release already in place)
    write theirs under `<output>/attempts/`, so a release only ever describes the run that built it."""
    manifest = ledger.manifest(status)
    options = ledger.config.output_storage_options
    stamp = ledger.started.strftime("%Y%m%dT%H%M%SZ")
    built_release = exported and ledger.stages["export"]["cache"] == "miss"
    url = storage.join(ledger.stages["export"]["uri"], releases.MANIFEST) if built_release else storage.join(
        ledger.config.output, releases.ATTEMPTS, f"{stamp}-{status}", releases.MANIFEST
    )
    if built_release:
        # Keep what export added (content hashes, code version); add export's own timing.
        manifest = {**storage.read_json(url, options), **{k: manifest[k] for k in ("status", "finished_at", "stages")}}
        manifest["release"]["decision"] = ledger.stages["export"]["stats"]["decision"]
    storage.write_json_atomic(url, manifest, options)
    manifest["manifest_uri"] = url
    return manifest


class TerminatedBySignal(BaseException):
    """SIGTERM (docker stop, systemd, Kubernetes) reached the CLI: unwind like Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise TerminatedBySignal(signum)


# Failures the user can fix, and whose message says how: printed without a type name.
USER_ERRORS = (DataValidationError, RefusedTargetError, ModelSourceError, TrainingDivergedError, ReleaseError)
RESUME_HINT = "run the same command again to resume from the last checkpoint"
# A run whose model lost to the champion: not a crash (1), not a success (0).
EXIT_REJECTED = 3


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    started = time.perf_counter()
    # Prefect swaps in its own SIGTERM handler during the run and hands the signal back to this one.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        manifest = _run_cli(config)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the run stopped (Ctrl-C); {RESUME_HINT}", file=sys.stderr)
        return 130
    except TerminatedBySignal as stopped:
        print(f"\nterminated: the run stopped ({stopped}); {RESUME_HINT}", file=sys.stderr)
        return 128 + stopped.signum
    except USER_ERRORS as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # the stage's traceback is already in the log above
        print(f"\nerror: the run failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_run_summary(manifest, time.perf_counter() - started, config.cache_storage_options))
    if manifest.get("status") == "rejected":
        print("\nrejected: the new model did not beat the one in production, which is unchanged", file=sys.stderr)
        return EXIT_REJECTED
    return 0


def _run_cli(config: SFTConfig) -> dict[str, Any]:
    # The flow checks the output too (deployments, the UI); here it fails before a server starts.
    check_output_target(config.output, config.output_storage_options, config.cache_dir, config.cache_storage_options)
    with api_for_cli():
        return sft(config)


if __name__ == "__main__":
    sys.exit(main())
