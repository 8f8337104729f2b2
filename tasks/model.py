"""import-model: turn what the user named into a local safetensors folder with its tokenizer.

A GGUF file (the embedded SmolLM2) is dequantized and converted once; the converted folder is keyed
by the GGUF's bytes, so every later run reloads safetensors in well under a second instead of
re-parsing GGUF metadata (~35 s). Local folders are used in place and keyed by their content.

A folder must hold config.json and safetensors weights; one that does not (or does not exist) is
refused with a ModelSourceError before anything in it is hashed or opened, so a pickle never is."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from prefect import task

from schemas.config import EMBEDDED_MODEL
from schemas.manifests import ModelArtifact
from tasks.core import embedded, hashing, storage
from tasks.core.modeling import ModelSourceError, check_model_folder  # the error is raised from here too
from tasks.retrying import cached_stage

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
WEIGHT_SUFFIXES = (".safetensors",)
# SmolLM2-Instruct's published special tokens. Older transformers read some of them wrongly from
# the GGUF (eos came out as <|im_start|>), so they are set explicitly after conversion.
SMOLLM2_SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}


def tokenizer_fingerprint(folder: str | Path) -> str:
    """Hash of the tokenizer's files: vocabulary, merges, special tokens and chat template."""
    folder = Path(folder)
    return hashing.hash_files([folder / name for name in TOKENIZER_FILES if (folder / name).exists()], root=folder)


def _folder_fingerprint(folder: Path) -> str:
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(("_", "."))]
    return hashing.hash_files(files, root=folder)


def model_entry(model: str, cache_dir: str) -> tuple[str, str]:
    """(key, url) of the converted model: keyed by the source's bytes, never its path."""
    source = _source_fingerprint(model)
    key = hashing.hash_parts("model", source, CODE_VERSION)[:24]
    return key, storage.join(cache_dir, "models", key)


def _source_fingerprint(model: str) -> str:
    if model == EMBEDDED_MODEL:
        return hashing.hash_url(str(embedded.smollm2_gguf_path()))
    folder = _local_folder(model)
    if folder is not None:
        return _folder_fingerprint(folder)
    return hashing.hash_parts("hub", model)  # a hub id: identity is the id (revision pinning is the hub's job)


def _local_folder(model: str) -> Path | None:
    """The checked folder `model` names, or None for a Hugging Face id (org/name). An existing path
    wins, as in transformers; a missing one must not fall through to the hub's "Repo id must be in
    the form ..." error."""
    path = Path(model).expanduser()
    if path.exists():
        return check_model_folder(path)
    if _is_hub_id(model):
        return None
    hint = "; a Hugging Face id is written org/name" if "/" not in model else ""
    raise ModelSourceError(f"model folder {path.absolute()} does not exist{hint}")


def _is_hub_id(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith((".", "/", "~")) and "\\" not in model


def import_model(
    model: str, cache_dir: str, trust_remote_code: bool = False, cache_storage_options: dict[str, Any] | None = None
) -> ModelArtifact:
    """Make `model` available as a safetensors folder in the cache and describe it. The artifact's
    uri is the cache entry (on local disk, the folder itself); readers take a `storage.local_copy`
    with the cache's storage options, so a remote cache never hands on a path of this machine."""
    key, url = model_entry(model, cache_dir)
    store_hit = storage.is_complete(url, cache_storage_options)
    if not store_hit:
        started = time.perf_counter()
        with storage.atomic_directory(url, cache_storage_options) as scratch:
            _convert(model, scratch, trust_remote_code)
        logger.info("Converted %s to safetensors in %.1f s", model, time.perf_counter() - started)
    folder = storage.local_copy(url, cache_storage_options)
    config = json.loads((folder / "config.json").read_text())
    return ModelArtifact(
        stage="import-model",
        uri=str(folder) if storage.is_local(url, cache_storage_options) else url,
        key=key,
        source=model,
        tokenizer_hash=tokenizer_fingerprint(folder),
        store_hit=store_hit,
        stats={"architecture": (config.get("architectures") or ["?"])[0], "model_type": config.get("model_type")},
    )


def _convert(model: str, target: Path, trust_remote_code: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == EMBEDDED_MODEL:
        _convert_gguf(embedded.smollm2_gguf_path(), target)
        return
    folder = _local_folder(model)
    source = str(folder) if folder is not None else model
    loaded = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, trust_remote_code=trust_remote_code, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    loaded.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for name, token in SMOLLM2_SPECIAL_TOKENS.items():
        setattr(tokenizer, name, token)
    # dequantize=True gives a plain fp32 model; without it save_pretrained refuses a gguf model.
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    loaded.config.quantization_config = None
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name)
        setattr(loaded.config, name, token_id)
        setattr(loaded.generation_config, name, token_id)
    loaded.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    # The weights stay fp32 (the exact dequantized values), but the model is published in bf16:
    # its config says so, and releases are written in the base model's dtype (export.dtype 'auto').
    config_file = target / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = "bfloat16"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


CODE_VERSION = hashing.code_version(sys.modules[__name__])


@task(**cached_stage("import-model", model_entry, delays=(5, 30)))
def import_model_task(
    model: str, cache_dir: str, trust_remote_code: bool = False, cache_storage_options: dict[str, Any] | None = None
) -> ModelArtifact:
    return import_model(model, cache_dir, trust_remote_code, cache_storage_options)
