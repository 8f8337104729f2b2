"""Shared fixtures: a tiny tokenizer and a tiny Llama built on the spot, and small data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

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
