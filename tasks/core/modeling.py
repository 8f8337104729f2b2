"""Loading the models a run compares and publishes: the base model, base + LoRA adapter, a fully
fine-tuned model, and a LoRA merged into its base.

Weights are read from safetensors only: a folder is checked before anything in it is opened
(`check_model_folder`; an adapter without `adapter_model.safetensors` is refused too) and loaded with
`use_safetensors=True`, so no pickle is ever executed. Model code from a repository runs only when
the caller passes `trust_remote_code=True`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What transformers loads with use_safetensors=True: one file, or the index of a sharded checkpoint.
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
FOLDER_CONTENTS = "a model folder holds config.json, model.safetensors (or its sharded index) and the tokenizer files"


class ModelSourceError(ValueError):
    """A model source that can never load as given: a missing folder, no config.json, pickle-only
    weights. A ValueError, not an OSError, so retry policies for transient I/O fail it at once."""


def check_model_folder(folder: str | Path) -> Path:
    """`folder`, once it is known to hold a config and safetensors weights. Only names are read, so
    a folder of pickles is refused before any of them is opened."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ModelSourceError(f"model folder {folder.absolute()} does not exist")
    if not folder.is_dir():
        raise ModelSourceError(f"{folder.absolute()} is a file, not a folder; {FOLDER_CONTENTS}")
    names = sorted(path.name for path in folder.iterdir())
    if "config.json" not in names:
        raise ModelSourceError(f"model folder {folder} has no config.json (it holds: {_brief(names)}); {FOLDER_CONTENTS}")
    if not any(name in names for name in MODEL_WEIGHTS):
        raise ModelSourceError(_no_safetensors(folder, names))
    return folder


def _no_safetensors(folder: Path, names: list[str]) -> str:
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if not pickles:
        return f"model folder {folder} has no model.safetensors (it holds: {_brief(names)}); {FOLDER_CONTENTS}"
    # Unpickling runs whatever code the file names, so the conversion is the user's call, made once.
    return (
        f"model folder {folder} has only pickle weights (*.bin/*.pt/*.pth/*.ckpt: {_brief(pickles)}), which are "
        "never loaded because unpickling can run arbitrary code. Convert them once, in a trusted environment: "
        "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True), "
        "and copy the tokenizer files beside it"
    )


def _brief(names: list[str], limit: int = 8) -> str:
    if not names:
        return "nothing"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def pick_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto': CUDA, else Apple MPS, else CPU. Training passes its LOCAL_RANK, so that under
    torchrun each process takes its own GPU, cuda:LOCAL_RANK."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(device)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it; fp32 elsewhere (bf16 on CPUs without bf16 units is very slow)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_causal_lm(folder: str | Path, trust_remote_code: bool = False, dtype: Any = torch.float32, device: Any = "cpu"):
    """A causal LM from a local safetensors folder, in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = check_model_folder(folder)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype
    )
    return model.to(device).eval()


def attach_adapter(base, adapter_folder: str | Path):
    """Wrap `base` with the LoRA adapter saved in `adapter_folder` (peft save_pretrained)."""
    from peft import PeftModel

    adapter_folder = Path(adapter_folder)
    if not (adapter_folder / ADAPTER_WEIGHTS).is_file():
        held = sorted(path.name for path in adapter_folder.iterdir()) if adapter_folder.is_dir() else []
        raise ModelSourceError(
            f"{adapter_folder} has no {ADAPTER_WEIGHTS} (it holds: {_brief(held)}); only safetensors adapters are loaded"
        )
    return PeftModel.from_pretrained(base, str(adapter_folder), is_trainable=False).eval()


def load_tuned(
    base_folder: str | Path,
    trained_folder: str | Path,
    method: str,
    trust_remote_code: bool = False,
    dtype: Any = torch.float32,
    device: Any = "cpu",
    base=None,
):
    """The tuned model of a train artifact folder: base + `adapter/` (LoRA) or `model/` (full).

    For LoRA an already loaded `base` may be passed; it is wrapped, not copied."""
    trained_folder = Path(trained_folder)
    if method == "lora":
        if base is None:
            base = load_causal_lm(base_folder, trust_remote_code, dtype, device)
        return attach_adapter(base, trained_folder / "adapter")
    if method == "full":
        return load_causal_lm(trained_folder / "model", trust_remote_code, dtype, device)
    raise ValueError(f"unknown training method {method!r}")


def merge_lora(base_folder: str | Path, adapter_folder: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    """Base + adapter merged into plain weights (merged in fp32, then cast once to `dtype`, by
    default the base's)."""
    base_folder = check_model_folder(base_folder)  # before AutoConfig, whose errors speak of hub repos
    wrapped = attach_adapter(load_causal_lm(base_folder, trust_remote_code, torch.float32), adapter_folder)
    return wrapped.merge_and_unload().to(dtype or saved_dtype(base_folder, trust_remote_code)).eval()


def saved_dtype(folder: str | Path, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a model folder's config declares (float32 when it declares none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_release(release_dir: str | Path, base_dir: str | Path, trust_remote_code: bool = False, dtype: Any = torch.float32,
                 device: Any = "cpu"):
    """The model a release serves: its merged weights, or the base with its adapter."""
    release_dir = Path(release_dir)
    if (release_dir / "config.json").is_file():
        return load_causal_lm(release_dir, trust_remote_code, dtype, device)
    base = load_causal_lm(base_dir, trust_remote_code, dtype, device)
    return attach_adapter(base, release_dir / "adapter").eval()


@contextlib.contextmanager
def logits_only_at(model, positions: torch.Tensor):
    """Within this block the model's LM head sees only the hidden states at `positions` (flat
    indices into (batch x sequence), on the model's device), so `.logits` is (positions, vocab).

    A pre-hook on the output embeddings, not the `logits_to_keep` argument: only transformers 5.21+
    accepts a 2-D mask there (older 5.x index `hidden_states[:, mask, :]` and fail), and remote-code
    models may not take the argument at all. The hook fires inside the wrapped model's own forward,
    so DDP's and FSDP's hooks around it run as usual. Indices, not a boolean mask: selecting by a
    mask on a GPU waits for the device to count it."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no output embeddings (get_output_embeddings() is None): "
                         "its logits cannot be computed at the loss positions only")

    def select(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("input")
        kept = hidden.flatten(0, -2).index_select(0, positions)
        return (kept, *args[1:]), kwargs

    handle = head.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def unwrap(model):
    """The transformers model inside DDP (`.module`) and peft wrappers (the model itself otherwise)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
