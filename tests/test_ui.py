"""The Prefect UI in headless Chromium, driven through the DevTools protocol: the deployment's run
form shows every config field with its description and default and refuses a value out of bounds,
and the run's page lists its artifacts. The server, deployment and run are the ones tests/test_deployments.py uses."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.server import ARTIFACT_KEYS, PrefectServer, wait_for

pytest_plugins = ["tests.server"]
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = [
    pytest.mark.slow,
    # Checked before any fixture starts a server.
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Chromium not found: the UI test needs Debian's `chromium` package (`make test` installs it as root)",
    ),
]
# Headless without a sandbox (tests run as root) and without any network of its own; a tall window
# so the UI's virtual scrollers render every artifact card.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,2400",
]
PAGE_TIMEOUT_S = 120


class Browser:
    """One Chromium page, driven with DevTools protocol calls over its websocket."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.socket, self.ids = None, itertools.count(1)
        try:
            port_file = profile / "DevToolsActivePort"  # Chromium writes the port it picked here
            wait_for(lambda: port_file.exists() and len(port_file.read_text().split()) >= 2, 60, "Chromium's DevTools port")
            port = int(port_file.read_text().split()[0])
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
            self.socket = connect(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"], max_size=None)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:  # events arrive in between; skip them
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, expected: list[str], what: str) -> str:
        """Wait until the page's visible text contains every expected string (compared with
        whitespace collapsed); fail listing the missing ones."""

        def found() -> str | None:
            text = _normalise(self.text())
            return text if all(_normalise(item) in text for item in expected) else None

        def missing() -> str:
            text = _normalise(self.text())
            return f"missing: {[item for item in expected if _normalise(item) not in text]}\npage text: {text[:3000]}"

        return wait_for(found, PAGE_TIMEOUT_S, what, interval=1, on_timeout=missing)

    def click(self, text: str) -> None:
        """Click the element whose own text is exactly `text` (a tab, a button)."""
        clicked = self.evaluate(
            "(() => { const el = [...document.querySelectorAll('li, button, a, [role=tab]')]"
            f".find(e => e.innerText && e.innerText.trim() === {json.dumps(text)});"
            " if (el) { el.click(); return true } return false })()"
        )
        assert clicked, f"nothing to click with the text {text!r}"

    def close(self) -> None:
        """Stop Chromium and every process it started (its own process group)."""
        if self.socket:
            self.socket.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(20)
                return


def _normalise(text: str) -> str:
    """Visible text as the UI renders it: markdown `code` loses its backticks, whitespace collapses."""
    return " ".join(text.replace("`", "").split())


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Browser]:
    page = Browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield page
    finally:
        page.close()


def test_run_form_shows_every_config_field_with_its_description_and_default(browser: Browser, prefect_server: PrefectServer, deployments):
    deployment = deployments["manual"]
    schema = deployment["parameter_openapi_schema"]
    fields = [(name, prop) for definition in schema["definitions"].values() for name, prop in definition["properties"].items()]
    # A nested section's property is a bare $ref: the UI titles it after its key, as pydantic does the rest.
    titles = [prop.get("title", name.replace("_", " ").title()) for name, prop in fields]
    expected = [f"{title} (Optional)" for title in titles] + [prop["description"] for _, prop in fields]

    browser.open(f"{prefect_server.url}/deployments/deployment/{deployment['id']}/run")
    browser.wait_for_text(["Parameters", *expected], "the run form with every config field")

    values = browser.evaluate("[...document.querySelectorAll('input, textarea, select')].map(e => e.value)")
    for default in ("embedded:smollm2-135m-instruct", "outputs/sft-run", ".sft-cache", "1024", "lora", "eval_loss"):
        assert default in values, f"default {default!r} not in the form's inputs"


def test_flow_run_page_lists_the_run_artifacts(browser: Browser, prefect_server: PrefectServer, ui_run):
    flow_run = ui_run["flow_run"]
    browser.open(f"{prefect_server.url}/runs/flow-run/{flow_run['id']}")
    browser.wait_for_text([flow_run["name"], "Completed", "Artifacts"], "the flow-run page")
    browser.click("Artifacts")
    browser.evaluate("document.querySelector('#artifacts-content .p-virtual-scroller')?.scrollIntoView()")
    text = browser.wait_for_text(sorted(ARTIFACT_KEYS), "the run's artifacts on its Artifacts tab")
    assert re.search(r"\bTABLE\b", text) and re.search(r"\bMARKDOWN\b", text)
