"""What a training run is told to do, as frozen dataclasses: the one place the training options'
names, choices and defaults are declared.

`schemas.config.TrainOptions` (pydantic: descriptions, bounds, the CLI and the UI form) takes its
defaults from here and hands the training core a `TrainSettings` (`TrainOptions.settings()`). The
training core, its torchrun workers and the benchmark read these alone, so a bare GPU box needs no
pydantic. The JSON form is `dataclasses.asdict`, read back with `TrainSettings.from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal["lora", "full"]
Scheduler = Literal["cosine", "linear", "constant"]
Device = Literal["auto", "cuda", "mps", "cpu"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Attention = Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "eager"]
Switch = Literal["auto", "on", "off"]
Strategy = Literal["ddp", "fsdp"]
ExportCheckpoint = Literal["auto", "best", "last"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEAK_LR = {"lora": 1e-3, "full": 2e-5}  # the peak learning rate when none is given


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS  # a tuple: frozen all the way down


@dataclass(frozen=True)
class TrainSettings:
    method: Method = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning_rate: float | None = None
    lr_scheduler: Scheduler = "cosine"
    warmup_ratio: float = 0.05
    max_steps: int | None = None
    epochs: float = 3.0
    micro_batch_size: int = 8
    micro_batch_tokens: int | None = 8192
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    packing: bool = True
    device: Device = "auto"
    precision: Precision = "auto"
    attention: Attention = "auto"
    gradient_checkpointing: Switch = "auto"
    compile: Switch = "auto"
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    devices: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = "127.0.0.1:29500"
    strategy: Strategy = "ddp"
    eval_every: int = 0
    early_stopping_patience: int = 0
    min_delta: float = 0.0
    export_checkpoint: ExportCheckpoint = "auto"

    @property
    def exports_best(self) -> bool:
        """Whether the weights published are the best held-out checkpoint ('auto': when evaluating)."""
        return self.eval_every > 0 and self.export_checkpoint in ("auto", "best")

    @property
    def peak_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else PEAK_LR[self.method]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainSettings":
        """The inverse of `dataclasses.asdict` (and of TrainOptions.model_dump(mode="json")):
        JSON lists become tuples again. An unknown name is a TypeError, never silently dropped."""
        lora = dict(values.get("lora") or {})
        if "target_modules" in lora:
            lora["target_modules"] = tuple(lora["target_modules"])
        return cls(**{**values, "lora": LoraSettings(**lora)})
