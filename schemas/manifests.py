"""Small records the stages hand each other: where an artifact lives and the content key it is
cached under. Never models or datasets themselves, so Prefect can persist them cheaply."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class StageResult(BaseModel):
    stage: str = Field(description="Stage that produced the artifact.")
    uri: str = Field(description="fsspec URL of the artifact.")
    key: str = Field(description="Content hash the artifact is cached under.")
    stats: dict[str, Any] = Field(default_factory=dict, description="Counts and figures worth reporting.")
    store_hit: bool = Field(False, description="The stage found a complete entry under its key and reused it.")


class ModelArtifact(StageResult):
    """A base model converted to a local safetensors folder with its tokenizer."""

    source: str = Field(description="What the user named: a folder, a hub id or an embedded name.")
    tokenizer_hash: str = Field(description="Hash of the tokenizer files, special tokens and chat template.")


class DataArtifact(StageResult):
    """Validated rows in our canonical form (JSONL of {messages, split, source})."""

    report_uri: str = Field(description="Validation report (JSON) with every rejected row.")


class TokenizedArtifact(StageResult):
    """Arrow DatasetDict (train/eval) with one row per example: input_ids, labels."""


class TrainArtifact(StageResult):
    """Trained weights: a LoRA adapter or a full model, plus the loss curve."""

    method: str = Field(description="'lora' or 'full'.")
    loss_curve_uri: str = Field(description="JSON list of {step, loss, lr, tokens} records.")


class EvalArtifact(StageResult):
    """Base vs tuned metrics, sample generations and the gate's verdict."""

    passed: bool = Field(description="Whether the tuned model passed the quality gate.")
    gate_message: str = Field("", description="Why the gate passed or failed.")


class ExportArtifact(StageResult):
    """A complete release folder."""
