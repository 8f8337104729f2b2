"""import-model and the model loading of evaluate/export: what they refuse, and how they say it.

Every refusal here is deterministic, so it is a ValueError (ModelSourceError), never an OSError:
retry policies retry I/O errors, and these must fail at once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.core import modeling
from tasks.model import ModelSourceError, import_model, model_entry


class Payload:
    """Unpickling this creates `marker`: the stand-in for code hidden in a pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def pickle_only_folder(tiny_model_dir: Path, target: Path, payload_marker: Path | None = None) -> Path:
    """The tiny model with its weights as a torch.save'd state dict (pytorch_model.bin) instead of
    safetensors, optionally with a payload in the pickle."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(tiny_model_dir, target)
    state = load_file(str(target / "model.safetensors"))
    (target / "model.safetensors").unlink()
    if payload_marker is not None:
        state["payload"] = Payload(payload_marker)
    torch.save(state, target / "pytorch_model.bin")
    return target


def assert_refused(error: pytest.ExceptionInfo, *words: str) -> None:
    assert not isinstance(error.value, OSError)
    message = str(error.value)
    for word in words:
        assert word in message, message


def test_model_source_error_is_not_retried_as_io():
    assert issubclass(ModelSourceError, ValueError) and not issubclass(ModelSourceError, OSError)


def test_import_refuses_pickle_state_dict(tiny_model_dir, tmp_path):
    folder = pickle_only_folder(tiny_model_dir, tmp_path / "bin-model")
    with pytest.raises(ModelSourceError) as error:
        import_model(str(folder), str(tmp_path / "cache"))
    assert_refused(error, "pytorch_model.bin", "pickle", "safe_serialization=True")
    assert not (tmp_path / "cache").exists()  # refused before anything was hashed or converted


def test_import_never_unpickles_a_payload(tiny_model_dir, tmp_path):
    marker = tmp_path / "payload-ran"
    folder = pickle_only_folder(tiny_model_dir, tmp_path / "evil-model", payload_marker=marker)
    with pytest.raises(ModelSourceError) as error:
        import_model(str(folder), str(tmp_path / "cache"))
    assert_refused(error, "pytorch_model.bin", "pickle")
    assert not marker.exists()


@pytest.mark.parametrize("loader", ["load_causal_lm", "load_tuned_full", "merge_lora"])
def test_eval_and_export_loading_never_unpickles(tiny_model_dir, tmp_path, loader):
    marker = tmp_path / "payload-ran"
    folder = pickle_only_folder(tiny_model_dir, tmp_path / "trained" / "model", payload_marker=marker)
    with pytest.raises(ModelSourceError) as error:
        if loader == "load_causal_lm":
            modeling.load_causal_lm(folder)
        elif loader == "load_tuned_full":
            modeling.load_tuned(tiny_model_dir, tmp_path / "trained", "full")
        else:
            modeling.merge_lora(folder, tmp_path / "adapter")
    assert_refused(error, "pytorch_model.bin", "pickle")
    assert not marker.exists()


def test_adapter_without_safetensors_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelSourceError) as error:
        modeling.attach_adapter(None, tmp_path / "adapter")
    assert_refused(error, "adapter_model.safetensors", "adapter_model.bin")


@pytest.mark.parametrize("name", ["./no-such-dir", "/abs/missing", "~/no-such-model-dir-3f9c", "no-such-dir", "a/b/c"])
def test_missing_folder_is_named(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    for call in (lambda: model_entry(name, str(tmp_path / "cache")), lambda: import_model(name, str(tmp_path / "cache"))):
        with pytest.raises(ModelSourceError) as error:
            call()
        assert_refused(error, "does not exist")
    with pytest.raises(ModelSourceError) as error:
        modeling.load_causal_lm(tmp_path / "missing")
    assert_refused(error, "does not exist")


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError) as error:
        model_entry(str(tmp_path / "model.safetensors"), str(tmp_path / "cache"))
    assert_refused(error, "not a folder")


def test_hub_id_keeps_the_hub_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    key, url = model_entry("HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path / "cache"))
    assert url.endswith(key)


def test_folder_without_config_says_what_is_missing(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-config"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").unlink()
    for call in (lambda: import_model(str(folder), str(tmp_path / "cache")), lambda: modeling.load_causal_lm(folder)):
        with pytest.raises(ModelSourceError) as error:
            call()
        assert_refused(error, "no config.json", "model.safetensors", "tokenizer.json")


def test_import_uses_safetensors_beside_a_stray_pickle(tiny_model_dir, tmp_path):
    """Both formats present: the safetensors are imported and the pickle is never opened."""
    marker = tmp_path / "payload-ran"
    folder = pickle_only_folder(tiny_model_dir, tmp_path / "both", payload_marker=marker)
    shutil.copy2(tiny_model_dir / "model.safetensors", folder / "model.safetensors")
    artifact = import_model(str(folder), str(tmp_path / "cache"))
    assert (Path(artifact.uri) / "model.safetensors").is_file()
    assert not (Path(artifact.uri) / "pytorch_model.bin").exists()
    assert artifact.stats["model_type"] == "llama"
    assert not marker.exists()
