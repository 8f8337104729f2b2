"""Loading the models a run compares and publishes: the base model, base + LoRA adapter, a fully
fine-tuned model, and a LoRA merged into its base.

Weights are read from safetensors only (`use_safetensors=True`; an adapter without
`adapter_model.safetensors` is refused), so no pickle is ever executed, and model code from a
repository runs only when the caller passes `trust_remote_code=True`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def pick_device(device: str = "auto") -> torch.device:
    """'auto': CUDA, else MPS, else CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it; fp32 elsewhere (bf16 on CPUs without bf16 units is very slow)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_causal_lm(folder: str | Path, trust_remote_code: bool = False, dtype: Any = torch.float32, device: Any = "cpu"):
    """A causal LM from a local safetensors folder, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype
    )
    return model.to(device).eval()


def attach_adapter(base, adapter_folder: str | Path):
    """Wrap `base` with the LoRA adapter saved in `adapter_folder` (peft save_pretrained)."""
    from peft import PeftModel

    adapter_folder = Path(adapter_folder)
    if not (adapter_folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{adapter_folder} has no {ADAPTER_WEIGHTS}; only safetensors adapters are loaded")
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


def merge_lora(base_folder: str | Path, adapter_folder: str | Path, trust_remote_code: bool = False):
    """Base + adapter merged into plain weights (merged in fp32, then cast back to the base's dtype)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_folder), trust_remote_code=trust_remote_code)
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    wrapped = attach_adapter(load_causal_lm(base_folder, trust_remote_code, torch.float32), adapter_folder)
    return wrapped.merge_and_unload().to(saved_dtype).eval()


def unwrap(model):
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
