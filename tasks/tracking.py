"""Run tracking in MLflow: the resolved config, the training curve, the evaluation scores, the
report files, and promoted releases in the model registry under the alias `champion`.

Tracking is off unless `tracking.mlflow_uri` or the MLFLOW_TRACKING_URI environment variable
names a tracking URI. mlflow is an optional extra (`pip install 'prefect-sft[tracking]'`),
imported only when tracking is on. Tracking never fails a run: an absent mlflow or a server that
does not answer is one warning and `start_run` returns None; any later MLflow error is one warning
and turns that run's tracker off. Only the flow's process logs: torchrun workers never call this
module, and a process with RANK > 0 in its environment gets no tracker.

How a release is registered. A tracking server accepts a local path as a model version's source
only inside the run's own artifact folder (`_validate_source_run` in mlflow/server/handlers.py:
otherwise a client could point the server at any file on its disk), and a path on the training
machine means nothing to other readers anyway. So a local release folder is registered as
`runs:/<run_id>/release`: the run's `release/` artifacts hold the release's small descriptive
files (model card, manifests, configs, metrics, plots: each at most 1 MiB, so never the weights).
A release at a remote fsspec URL (s3://, gs://, ...) is registered with that URL as its source.
Either way the version carries the tags `release` (the release's folder name) and `release_uri`
(where the complete release lives); `set_champion` finds a release's version by its tag.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeVar
from urllib.parse import urlparse

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from schemas.config import TrackingOptions

logger = logging.getLogger(__name__)

CHAMPION = "champion"
RELEASE_ARTIFACTS = "release"  # the run's artifact folder a local release is registered from
SMALL_FILE_BYTES = 1 << 20  # model card, manifests, configs, metrics and plots; never weights
TRUNCATED = "...[truncated]"
# MLflow's limits (mlflow/utils/validation.py), repeated so that flattening needs no mlflow import.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
# MLflow's defaults (120 s a request, 7 retries with exponential backoff) would stall a finished
# training run for minutes on a dead server; every request here is small. Exported values win.
RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", RETRIES: "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# Our run statuses onto MLflow's: a rejected release is a run that finished (and says so in a tag).
RUN_STATUS = {
    "completed": "FINISHED",
    "rejected": "FINISHED",
    "failed": "FAILED",
    "interrupted": "KILLED",
    "terminated": "KILLED",
}
LOCAL_SCHEMES = {"", "file", "local"}

Result = TypeVar("Result")


def tracking_uri(options: TrackingOptions) -> str | None:
    """Where runs are logged: the option, else MLFLOW_TRACKING_URI, else None (tracking off)."""
    return options.mlflow_uri.strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip() or None


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def start_run(
    options: TrackingOptions, run_name: str, params: dict[str, Any], tags: dict[str, Any] | None = None
) -> RunTracker | None:
    """A new MLflow run with the resolved config as params; None when tracking is off, mlflow is
    not installed or the server does not answer (then after one warning)."""
    uri = tracking_uri(options)
    if uri is None or not is_main_process():
        return None
    try:
        client = _client(uri)
        with _single_attempt():
            experiment_id = _experiment_id(client, options.experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=_limited_strings(tags or {}, MAX_TAG_VALUE))
    except ImportError:
        logger.warning("Tracking is set to %s but mlflow is not installed (pip install 'prefect-sft[tracking]'): this run is not tracked", uri)
        return None
    except Exception as error:  # noqa: BLE001 - a tracking server that is down never fails a run
        logger.warning("MLflow at %s did not answer, this run is not tracked: %s", uri, _reason(error))
        return None
    tracker = RunTracker(client, run.info.run_id, options.registered_model, _run_url(uri, experiment_id, run.info.run_id))
    tracker.log_params(params)
    return tracker


def set_champion(options: TrackingOptions, release: str) -> str | None:
    """Move the `champion` alias to the registered version of `release` (promote, rollback); the
    version, or None when tracking is off, the release was never registered or MLflow failed."""
    uri = tracking_uri(options)
    if uri is None:
        return None
    try:
        client = _client(uri)
        version = find_version(client, options.registered_model, release)
        if version is None:
            logger.warning("Release %s has no version in MLflow model %s: the champion alias stays", release, options.registered_model)
            return None
        client.set_registered_model_alias(options.registered_model, CHAMPION, version)
        return version
    except Exception as error:  # noqa: BLE001 - the registry is a mirror; the release's own state decides
        logger.warning("Could not move the MLflow champion alias of %s to %s: %s", options.registered_model, release, _reason(error))
        return None


def find_version(client: MlflowClient, model: str, release: str) -> str | None:
    """The version of registered `model` tagged with `release`, the newest if several."""
    found = client.search_model_versions(f"name = {_quoted(model)} and tags.release = {_quoted(release)}")
    return str(max(int(v.version) for v in found)) if found else None


def _guarded(what: str) -> Callable[[Callable[..., Result]], Callable[..., Result | None]]:
    """A tracker method that does nothing once the tracker is off, and turns it off (one warning)
    instead of raising: a tracking failure never fails the run."""

    def wrap(method: Callable[..., Result]) -> Callable[..., Result | None]:
        @functools.wraps(method)
        def guarded(self: RunTracker, *args: Any, **kwargs: Any) -> Result | None:
            if not self.active:
                return None
            try:
                return method(self, *args, **kwargs)
            except Exception as error:  # noqa: BLE001
                self.active = False
                logger.warning("MLflow tracking stopped while %s: %s", what, _reason(error))
                return None

        return guarded

    return wrap


class RunTracker:
    """One MLflow run. Methods log and return; none raises (see `_guarded`)."""

    def __init__(self, client: MlflowClient, run_id: str, registered_model: str, url: str | None = None):
        self.client, self.run_id, self.registered_model = client, run_id, registered_model
        self.url = url  # the run's page in the MLflow UI, when the tracking URI is a server
        self.active = True  # False after the first failure or after `end`
        self.ended = False

    @_guarded("logging the config")
    def log_params(self, params: dict[str, Any]) -> None:
        """The resolved config as params with dotted keys (`train.learning_rate`)."""
        from mlflow.entities import Param

        flat = [Param(key, value) for key, value in flat_params(params).items()]
        for batch in _batches(flat, PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)

    @_guarded("logging the training curve")
    def log_training(self, curve: Sequence[dict]) -> None:
        """Per step: train_loss, learning_rate, grad_norm and tokens_per_s."""
        self._log_metrics(curve_metrics(curve))

    @_guarded("logging the evaluation")
    def log_evaluation(self, scores: dict[str, dict]) -> None:
        """Each finite score of each role (base, champion, challenger) as `<role>.<metric>`."""
        self._log_metrics([(_valid_key(f"{role}.{name}"), value, 0) for role, values in scores.items() for name, value in _numbers(values)])

    @_guarded("uploading files")
    def log_files(self, paths: Iterable[Path | str]) -> None:
        """Each file that exists (loss plot, model card, metrics) as an artifact of the run."""
        for path in map(Path, paths):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    @_guarded("registering the release")
    def register_release(self, release_uri: str, promoted: bool, release: str | None = None) -> str | None:
        """A version of the registered model for the release at `release_uri` (named `release`,
        by default its folder name; the existing version when it was registered before), given the
        `champion` alias when promoted; its version string."""
        release = release or release_name(release_uri)
        version = find_version(self.client, self.registered_model, release) or self._new_version(release_uri, release)
        if promoted:
            self.client.set_registered_model_alias(self.registered_model, CHAMPION, version)
        return version

    def end(self, status: str) -> None:
        """Close the run with our status as a tag: completed and rejected -> FINISHED (rejected
        also tagged decision=rejected), failed -> FAILED, interrupted and terminated -> KILLED."""
        if self.ended:
            return
        if self.active:
            self._close(status)
        else:  # an earlier failure turned the tracker off: one quiet try, so the run is not left RUNNING
            with contextlib.suppress(Exception), _single_attempt():
                self.client.set_terminated(self.run_id, RUN_STATUS.get(status, "FAILED"))
        self.ended, self.active = True, False

    @_guarded("closing the run")
    def _close(self, status: str) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag("status", status), *([RunTag("decision", "rejected")] if status == "rejected" else [])]
        self.client.log_batch(self.run_id, tags=tags)
        self.client.set_terminated(self.run_id, RUN_STATUS.get(status, "FAILED"))

    def _log_metrics(self, points: Sequence[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value, step in points]
        for batch in _batches(metrics, METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch)

    def _new_version(self, release_uri: str, release: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(self.registered_model)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        folder = local_folder(release_uri)
        tags = {"release": release, "release_uri": str(folder) if folder else release_uri}
        source = self._upload_release(folder) if folder else release_uri
        # No waiting for READY: open-source registries create versions ready, and an alias may
        # point at a version that a hosted registry is still copying.
        version = self.client.create_model_version(self.registered_model, source, run_id=self.run_id, tags=tags, await_creation_for=0)
        return str(version.version)

    def _upload_release(self, folder: Path) -> str:
        """A local release's small files as this run's `release/` artifacts, and their runs:/ URI
        (a server refuses local paths outside the run's artifacts as sources, see the module doc)."""
        for path in small_files(folder):
            subfolder = path.parent.relative_to(folder).as_posix()
            artifact_path = RELEASE_ARTIFACTS if subfolder == "." else f"{RELEASE_ARTIFACTS}/{subfolder}"
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        return f"runs:/{self.run_id}/{RELEASE_ARTIFACTS}"


def flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {dotted.key: text}; lists and empty dicts as JSON, long texts truncated."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[_valid_key(name)] = _truncated(text, MAX_PARAM_VALUE)
    return flat


def curve_metrics(curve: Sequence[dict]) -> list[tuple[str, float, int]]:
    """(key, value, step) for each training record. The curve holds cumulative `tokens` and
    `elapsed_s` (training seconds, resumed runs included), so tokens/s is the change between
    consecutive records."""
    points: list[tuple[str, float, int]] = []
    tokens, seconds = 0, 0.0
    for record in curve:
        step = int(record["step"])
        for key, field in (("train_loss", "loss"), ("learning_rate", "lr"), ("grad_norm", "grad_norm")):
            if _finite(record.get(field)):
                points.append((key, float(record[field]), step))
        if _finite(record.get("tokens")) and _finite(record.get("elapsed_s")):
            if record["elapsed_s"] > seconds:
                points.append(("tokens_per_s", (record["tokens"] - tokens) / (record["elapsed_s"] - seconds), step))
            tokens, seconds = record["tokens"], record["elapsed_s"]
    return points


def release_name(release_uri: str) -> str:
    return release_uri.rstrip("/").rsplit("/", 1)[-1]


def local_folder(release_uri: str) -> Path | None:
    """The absolute local folder a release URI names, or None for a remote URL."""
    if urlparse(release_uri).scheme not in LOCAL_SCHEMES:
        return None
    return Path(release_uri.removeprefix("file://").removeprefix("local://")).resolve()


def small_files(folder: Path) -> list[Path]:
    """The release's descriptive files, at any depth: everything up to SMALL_FILE_BYTES."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size <= SMALL_FILE_BYTES)


def _client(uri: str) -> MlflowClient:
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    from mlflow.tracking import MlflowClient  # optional extra, imported only when tracking is on

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _single_attempt() -> Iterator[None]:
    """The first request goes out once, unretried: a server that is down costs one refused
    connection (or one timeout) and one warning, not a series of retries and their warnings."""
    saved = os.environ.get(RETRIES)
    os.environ[RETRIES] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(RETRIES, None)
        else:
            os.environ[RETRIES] = saved


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def _run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    if urlparse(uri).scheme not in ("http", "https"):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _numbers(values: dict) -> list[tuple[str, float]]:
    """The finite numbers of a score dict (counts included); bools, text and NaN left out."""
    return [(str(k), float(v)) for k, v in values.items() if _finite(v) and not isinstance(v, bool)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _batches(items: list, size: int) -> Iterable[list]:
    return (items[start : start + size] for start in range(0, len(items), size))


def _valid_key(name: str) -> str:
    """A name MLflow accepts: alphanumerics, `_ - . space` (`/` and `:` are paths or Windows-only)."""
    key = re.sub(r"[^\w.\- ]", "_", name)[:MAX_KEY]
    return f"_{key}" if key.startswith(".") or not key else key


def _truncated(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def _limited_strings(values: dict[str, Any], limit: int) -> dict[str, str]:
    return {str(k): _truncated(str(v), limit) for k, v in values.items()}


def _quoted(value: str) -> str:
    """A string literal for MLflow's search filter, which has no escapes: double quotes around a
    value with a single quote in it (our release names have no quotes at all)."""
    return f'"{value}"' if "'" in value else f"'{value}'"


def _reason(error: BaseException) -> str:
    """The first line of an error, short: MLflow's connection errors run to pages of retries."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return f"{type(error).__name__}: {lines[0][:300]}"
