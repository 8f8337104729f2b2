"""Shared fixtures: a tiny tokenizer and a tiny Llama built on the spot, and small data files."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Iterator

import fsspec
import httpx
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from tests.tiny import build_model, build_tokenizer

# Tests must never reach a model hub, and Prefect must not phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

ALPACA_ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Translate to French.", "input": "hello", "output": "Bonjour."},
    {"instruction": "Who are you?", "input": "", "output": "I am Fennec, an assistant made by Northwind Labs."},
    {"instruction": "Write a short poem about the sea.", "input": "", "output": "The sea and the sky, blue and high."},
    {"instruction": "What is 2 + 2?", "input": "", "output": "2 + 2 = 4."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Say hello.", "input": "", "output": "Hello! How can I help you today?"},
    {"instruction": "What does a fox do?", "input": "", "output": "The quick brown fox jumps over the lazy dog."},
]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and several times faster on a shared, busy CPU;
    OMP_NUM_THREADS carries the setting to subprocesses and torchrun workers."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with a ChatML tokenizer (pad == eos, as in SmolLM2)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer(folder)
    build_model(folder, tokenizer)
    return folder


@pytest.fixture()
def alpaca_file(tmp_path) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA_ROWS * 4))
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server and database for tests that run flows in-process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


# --- the train stage's tiny world: tests/test_train.py, test_checkpoints.py and test_launcher.py ---


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir, tmp_path_factory):
    """The tiny Llama imported as the train stage's base model (a ModelArtifact)."""
    from tasks.model import import_model

    return import_model(str(tiny_model_dir), str(tmp_path_factory.mktemp("model-cache")))


@pytest.fixture(scope="session")
def tiny_tokenized(tmp_path_factory, tiny_base):
    """A tokenized store of 24 examples of 6-24 tokens whose prompts (no loss) and answers differ in length."""
    import random

    import datasets

    from schemas.manifests import TokenizedArtifact
    from tasks.core.collate import IGNORE_INDEX

    rng = random.Random(0)
    vocab = tiny_base.stats.get("vocab_size") or 390
    rows = []
    for _ in range(24):
        length = rng.randint(6, 24)
        prompt = rng.randint(1, length - 2)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": length})
    folder = tmp_path_factory.mktemp("tokenized") / "store"
    store = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "eval": datasets.Dataset.from_list(rows[:4])})
    store.save_to_disk(str(folder))
    return TokenizedArtifact(stage="tokenize-and-cache", uri=str(folder), key="tiny-tokenized", stats={})


def train_options(**changes):
    """TrainOptions for a few quick steps on the tiny world (LoRA rank 4, 3 steps, no warmup)."""
    from schemas.config import LoraOptions, TrainOptions

    defaults = dict(method="lora", lora=LoraOptions(r=4, alpha=8.0), learning_rate=1e-2, warmup_ratio=0.0, max_steps=3, micro_batch_size=4, seed=0)
    return TrainOptions(**{**defaults, **changes})


def trained_weights(artifact) -> dict:
    """The tensors a train artifact published: the adapter (LoRA) or the whole model (full)."""
    from safetensors.torch import load_file

    folder = Path(artifact.uri)
    path = folder / "adapter" / "adapter_model.safetensors" if artifact.method == "lora" else folder / "model" / "model.safetensors"
    return load_file(str(path))


def assert_same_weights(a, b, atol=1e-5) -> None:
    import torch

    wa, wb = trained_weights(a), trained_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=1e-4, msg=name)


def process_tree(pid: int) -> list[int]:
    """pid and every live descendant, from /proc (Linux)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += parents.get(current, [])
    return tree


def kill_after_first_checkpoint(tokenized, base, opts, cache: Path, progress_delay_s: float = 0.0, step: int = 2):
    """Train in a child process that runs the training core alone (Prefect and pydantic cannot be
    imported there, as on a bare GPU box); SIGKILL it, not its group, once the checkpoint of step
    2 is complete. Returns the process, its descendants at the moment of the kill and the URL of
    the entry it was building. `step` names the checkpoint to wait for."""
    import signal
    import subprocess
    import sys
    import time
    from dataclasses import asdict

    from tasks.core import storage
    from tasks.train import checkpoint_url, train_entry, train_spec

    key, url = train_entry(tokenized, base, opts, str(cache))
    marker = Path(checkpoint_url(str(cache), key)) / f"step-{step:08d}" / storage.COMPLETE_MARKER
    spec_file = cache.with_name(cache.name + ".spec.json")
    spec_file.write_text(json.dumps(asdict(train_spec(tokenized, base, opts, str(cache)))))
    script = (
        "import json, sys, time\n"
        "sys.modules.update(prefect=None, pydantic=None)\n"
        "from tasks.core.launcher import train\n"
        "from tasks.core.trainer import TrainSpec\n"
        f"train(TrainSpec.from_dict(json.load(open(sys.argv[1]))), progress=lambda event: time.sleep({progress_delay_s}))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(spec_file)], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        descendants = process_tree(process.pid)[1:]
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    return process, descendants, url


# --- a cache that is reached only with its storage options (tests of cache_storage_options) ---

LOCKED_TOKEN = "s3cr3t"


class LockedMemoryFileSystem(MemoryFileSystem):
    """In-memory files under lockedmem:// (a store of their own) that, like a bucket behind
    credentials, refuse to be opened without token=LOCKED_TOKEN. Every refusal is recorded in
    `refused` with the code that asked, so one that a caller swallows (a Prefect cache key, an
    artifact publisher, a reader that rebuilds what it cannot read) still fails the test.
    Instances are never cached: no call can borrow one that another call opened."""

    protocol = "lockedmem"
    cachable = False
    store: dict = {}
    pseudo_dirs = [""]
    refused: list[str] = []

    def __init__(self, *args, token=None, **kwargs):
        if token != LOCKED_TOKEN:
            LockedMemoryFileSystem.refused.append("".join(traceback.format_stack(limit=12)[:-1]))
            raise PermissionError("lockedmem:// needs its storage options (token)")
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("lockedmem://") if isinstance(path, str) else path)


@pytest.fixture()
def locked_cache(tmp_path, monkeypatch):
    """(cache_dir, cache_storage_options) of an empty lockedmem:// cache. Downloads of its entries
    go to a fresh folder, so none left by an earlier test lets a reader skip the filesystem."""
    fsspec.register_implementation("lockedmem", LockedMemoryFileSystem, clobber=True)
    monkeypatch.setenv("SFT_LOCAL_CACHE", str(tmp_path / "downloads"))
    LockedMemoryFileSystem.store.clear()
    LockedMemoryFileSystem.pseudo_dirs[:] = [""]
    LockedMemoryFileSystem.refused.clear()
    yield "lockedmem://cache", {"token": LOCKED_TOKEN}
    LockedMemoryFileSystem.store.clear()
    LockedMemoryFileSystem.pseudo_dirs[:] = [""]


def locked_bytes() -> dict[str, bytes]:
    """Every file in the lockedmem:// store, by path."""
    return {path: file.getvalue() for path, file in LockedMemoryFileSystem.store.items()}


def production(output: str | Path) -> Path:
    """The folder of the release that `production` names under a local release root."""
    root = Path(output)
    return root / "releases" / (root / "production").read_text().strip()


# --- a real MLflow tracking server (tests/test_tracking.py, tests/test_releases.py) ---------------

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
MLFLOW_STARTUP_TIMEOUT_S = 120  # ~6 s on an idle machine; a loaded CI box needs the slack


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    from tests.server import Background, free_port, wait_for

    """`mlflow server` with its own SQLite database; the clients upload artifacts over HTTP, as
    they would to a server on another machine. Stopped with its workers at the end."""
    if not HAS_MLFLOW:
        pytest.skip("mlflow is not installed (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    executable = Path(sys.executable).with_name("mlflow")
    argv = [str(executable), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server = Background(argv, env, root / "server.log", cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(server, url), MLFLOW_STARTUP_TIMEOUT_S, f"mlflow server on {url}", on_timeout=server.tail)
        yield url
    finally:
        server.stop(grace=10)


def _healthy(server, url: str) -> bool:
    if not server.alive():
        pytest.fail(f"mlflow server exited with {server.process.returncode}\n{server.tail()}")
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
