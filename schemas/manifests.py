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


class ShardArtifact(StageResult):
    """One shard's cache entry (validated rows, or their tokens): the flow maps the shards over
    processes or a Dask cluster and hands the stage these records, never the rows."""


class DataArtifact(StageResult):
    """Validated rows in our canonical form: `uri` is the manifest naming the shards' canonical
    JSONL files in order and which rows are held out or dropped (tasks/core/rows.read_dataset)."""

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


class Champion(BaseModel):
    """The release in production that a new model must beat (tasks/releases.py)."""

    name: str = Field(description="Release name under <output>/releases/.")
    url: str = Field(description="fsspec URL of the release folder.")
    key: str = Field(description="The release's content key: the champion's scores are cached under it.")


class ExportArtifact(StageResult):
    """A complete release folder."""


class ReleaseInputs(BaseModel):
    """Everything upstream produced that a release is built from, in one record."""

    model: ModelArtifact = Field(description="The imported base model and its tokenizer.")
    data: DataArtifact = Field(description="The validated rows and their validation report.")
    tokenized: TokenizedArtifact = Field(description="The tokenized store.")
    trained: TrainArtifact = Field(description="The trained weights and loss curve.")
    evaluation: EvalArtifact = Field(description="Base vs tuned results and the gate's verdict (always present: a disabled evaluation passes).")

    def content_keys(self) -> dict[str, str]:
        """Each upstream stage's content key: together they say what the release is built from.
        (Not `keys`: Prefect would take a model with a keys() method for a mapping.)"""
        return {name: getattr(self, name).key for name in ("model", "data", "tokenized", "trained", "evaluation")}


class OutputTarget(BaseModel):
    """Where the release goes: an fsspec URL and the storage options for it (the output's own
    credentials, never the data's or the cache's)."""

    url: str = Field(description="fsspec URL of the release folder.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options for `url`.")
