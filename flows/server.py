"""The Prefect API a CLI run talks to when none is configured.

Prefect's own temporary server is a child in the CLI's process group: Ctrl-C in the terminal
kills it together with the run, and the run then spends minutes retrying to report its crash to
a server that is gone. SIGTERM and kill -9 of the CLI leave it running as an orphan (~200 MB).
This one is the same app (Prefect's API, no UI), started in a session of its own, so a terminal's
Ctrl-C reaches only the run, and with the kernel's parent-death signal, so it never outlives the
CLI. It is stopped at interpreter exit, after Prefect's log and event workers have flushed."""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import prefect
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from tasks.core.processes import die_with_parent


@contextlib.contextmanager
def api_for_cli() -> Iterator[str]:
    """The configured PREFECT_API_URL, or a local server started for this process."""
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    url = start_local_server()
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


def start_local_server(timeout_s: float | None = None) -> str:
    """Start Prefect's API on a free loopback port; returns its API URL once healthy."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "--lifespan", "on"],
        # As Prefect starts its temporary server: no UI, and the services a temporary server skips.
        env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    atexit.register(_stop, process)
    url = f"http://127.0.0.1:{port}/api"
    _wait_healthy(process, url, timeout_s or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    return url


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(process: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the local Prefect server exited with {process.returncode} while starting")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health").status_code == 200:
                    return
            time.sleep(0.2)
    _stop(process)
    raise RuntimeError(f"the local Prefect server did not answer within {timeout_s:.0f} s "
                       "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a loaded machine)")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
