"""Real Prefect processes for the tests, and the pytest fixtures that share them.

`PrefectServer` runs `prefect server start` on a free loopback port with its own PREFECT_HOME
(and so its own SQLite database) in a temporary folder, and starts workers or `serve` processes
pointed at it; closing it stops all of them. Test modules load this file with
`pytest_plugins = ["tests.server"]`, so the deployment tests and the UI test share one server,
one deployment and one completed run per session. (PYTEST_DONT_REWRITE: the test modules import
it before pytest loads it as a plugin; its few asserts carry their own messages.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
WORK_POOL = "sft-process"
# Same slack as the flow gives its ephemeral server: a loaded 2-core machine needs it.
STARTUP_TIMEOUT_S = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
RUN_TIMEOUT_S = 900
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# Artifacts the stages publish for the UI: validation report, dataset statistics, base vs tuned
# metrics, the markdown report and the link to the release (the progress artifact has no key).
ARTIFACT_KEYS = {"validation-report", "tokenize-stats", "sft-eval-metrics", "sft-eval-report", "sft-release"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5, on_timeout: Callable[[], str] = str) -> Any:
    """Poll `check` until it returns something truthy; fail the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{on_timeout()}")
        time.sleep(interval)


class Background:
    """A child process in its own process group with its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path = REPO):
        self.log = log
        self._log_handle = log.open("ab")
        self.process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=self._log_handle, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- last lines of {self.log.name} ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 20) -> None:
        """SIGTERM to the process group (a worker's flow-run children included), SIGKILL after `grace`."""
        if self.alive():
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log_handle.close()


class PrefectServer:
    """`prefect server start` on 127.0.0.1:<free port>, with everything it needs under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        self.http = httpx.Client(base_url=self.api_url, timeout=60)
        self.env = self._environment()
        self.children: list[Background] = []
        self.process: Background | None = None

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.root / "home"),
            PREFECT_API_URL=self.api_url,
            # The UI in the browser must call this server, not the default 127.0.0.1:4200.
            PREFECT_UI_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=str(int(STARTUP_TIMEOUT_S)),
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_RUNNER_POLL_FREQUENCY="2",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )
        return env

    def start(self) -> "PrefectServer":
        self.process = Background(
            [self.executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            self.env,
            self.root / "server.log",
        )
        wait_for(self._healthy, STARTUP_TIMEOUT_S, f"the Prefect server on {self.url}", on_timeout=self.process.tail)
        return self

    def _healthy(self) -> bool:
        if not self.process.alive():
            pytest.fail(f"prefect server start exited with {self.process.process.returncode}\n{self.process.tail()}")
        try:
            return self.http.get("/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def executable(name: str) -> str:
        """A console script of this interpreter's environment (the venv), whatever PATH says."""
        return str(Path(sys.executable).with_name(name)) if Path(sys.executable).with_name(name).exists() else shutil.which(name)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a `prefect ...` command against this server, as a user would; fail the test on a non-zero exit."""
        result = subprocess.run(
            [self.executable("prefect"), "--no-prompt", *args],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout,
        )
        if result.returncode != 0:
            pytest.fail(f"prefect {' '.join(args)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def background(self, argv: list[str], name: str) -> Background:
        child = Background(argv, self.env, self.root / f"{name}.log")
        self.children.append(child)
        return child

    def worker(self, pool: str = WORK_POOL) -> Background:
        return self.background([self.executable("prefect"), "worker", "start", "--pool", pool, "--limit", "1"], f"worker-{pool}")

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call, retried on 503: the server answers that when its SQLite database is
        locked by the worker's writes (retryable, as Prefect's own client treats it)."""
        for delay in (0.5, 1, 2, 4, 8):
            response = self.http.request(method, path, **kwargs)
            if response.status_code != 503:
                return response
            time.sleep(delay)
        return self.http.request(method, path, **kwargs)

    def deployment(self, flow: str, name: str) -> dict[str, Any]:
        response = self.api("GET", f"/deployments/name/{flow}/{name}")
        response.raise_for_status()
        return response.json()

    def wait_for_run(self, flow_run_id: str, timeout: float = RUN_TIMEOUT_S, logs: Background | None = None) -> dict[str, Any]:
        """Poll the flow run until it reaches a terminal state; return it."""

        def terminal() -> dict[str, Any] | None:
            run = self.api("GET", f"/flow_runs/{flow_run_id}").json()
            return run if run.get("state_type") in TERMINAL_STATES else None

        return wait_for(terminal, timeout, f"flow run {flow_run_id}", interval=2, on_timeout=logs.tail if logs else str)

    def run_logs(self, flow_run_id: str) -> str:
        body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
        return "\n".join(entry["message"] for entry in self.api("POST", "/logs/filter", json=body).json())

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self.process:
            self.process.stop()
        self.http.close()


# --- fixtures shared by tests/test_deployments.py and tests/test_ui.py ---------------------------

def tiny_run_config(model_dir: Path, data_file: Path, root: Path) -> dict[str, Any]:
    """An SFTConfig (as JSON) for a run of seconds: 2-layer model, 2 steps, 2 short generations."""
    return {
        "data": [str(data_file)],
        "model": str(model_dir),
        "output": str(root / "release"),
        "cache_dir": str(root / "cache"),
        "data_options": {"eval_fraction": 0.25},
        "template": {"max_length": 128},
        "train": {"max_steps": 2, "micro_batch_size": 2, "device": "cpu"},
        # A random 2-layer model is not expected to improve in 2 steps: no gate on the metric.
        "eval": {"num_generate": 2, "max_new_tokens": 4, "gate": {"max_regression": None}},
    }


def write_alpaca(path: Path) -> Path:
    from tests.conftest import ALPACA_ROWS

    path.write_text(json.dumps(ALPACA_ROWS * 4, indent=1))
    return path


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture(scope="session")
def deployments(prefect_server: PrefectServer) -> dict[str, dict[str, Any]]:
    """The work pool, the `gpu` limit and both deployments of deployments/prefect.yaml."""
    from prefect.workers.process import ProcessWorker

    # What `prefect work-pool create sft-process --type process` and
    # `prefect concurrency-limit create gpu 1` do, without two more CLI start-ups.
    pool = {"name": WORK_POOL, "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template()}
    prefect_server.api("POST", "/work_pools/", json=pool).raise_for_status()
    prefect_server.api("POST", "/concurrency_limits/", json={"tag": "gpu", "concurrency_limit": 1}).raise_for_status()
    prefect_server.cli("deploy", "--all", "--prefect-file", str(PREFECT_FILE.relative_to(REPO)))
    return {name: prefect_server.deployment("sft", name) for name in ("scheduled-retraining", "manual")}


@pytest.fixture(scope="session")
def worker(prefect_server: PrefectServer, deployments) -> Background:
    return prefect_server.worker()


@pytest.fixture(scope="session")
def ui_run(prefect_server: PrefectServer, deployments, worker, tiny_model_dir, tmp_path_factory) -> dict[str, Any]:
    """A run of the manual deployment started with the UI's own REST call and executed by the
    worker, while the test holds the only `gpu` slot until the run's train stage is waiting for it."""
    root = tmp_path_factory.mktemp("ui-run")
    config = tiny_run_config(tiny_model_dir, write_alpaca(root / "alpaca.json"), root)
    slot = {"names": ["tag:gpu"], "slots": 1}
    prefect_server.api("POST", "/v2/concurrency_limits/increment", json=slot).raise_for_status()
    response = prefect_server.api(
        "POST", f"/deployments/{deployments['manual']['id']}/create_flow_run", json={"parameters": {"config": config}}
    )
    assert response.status_code == 201, response.text
    flow_run_id = response.json()["id"]
    try:

        def train_or_end() -> dict[str, Any] | None:
            ended = prefect_server.api("GET", f"/flow_runs/{flow_run_id}").json()["state_type"] in TERMINAL_STATES
            return _task_run(prefect_server, flow_run_id, "train") or ({"state_type": None} if ended else None)

        wait_for(train_or_end, RUN_TIMEOUT_S, "the train task run", interval=1, on_timeout=worker.tail)
        time.sleep(3)  # time enough to start, were it not waiting for the slot
        train_state = (_task_run(prefect_server, flow_run_id, "train") or {}).get("state_type")
    finally:
        prefect_server.api("POST", "/v2/concurrency_limits/decrement", json=slot).raise_for_status()
    flow_run = prefect_server.wait_for_run(flow_run_id, logs=worker)
    production = root / "release" / "production"
    manifest_file = root / "release" / "releases" / production.read_text().strip() / "run_manifest.json" if production.exists() else root / "none"
    return {
        "flow_run": flow_run,
        "config": config,
        "train_state_while_gpu_held": train_state,
        # Later tests re-run this config; keep this run's own record.
        "manifest": json.loads(manifest_file.read_text()) if manifest_file.exists() else {},
    }


def _task_run(server: PrefectServer, flow_run_id: str, stage: str) -> dict[str, Any] | None:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "task_runs": {"name": {"like_": f"{stage}-"}}}
    runs = [run for run in server.api("POST", "/task_runs/filter", json=body).json() if run["name"].rsplit("-", 1)[0] == stage]
    return runs[0] if runs else None
