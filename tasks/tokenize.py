"""tokenize-and-cache: canonical rows -> Arrow DatasetDict(train, eval) of input_ids/labels/length.

The entry is keyed by content: the validated data's bytes (DataArtifact.key), the tokenizer's files
and chat template (ModelArtifact.tokenizer_hash), every TemplateOptions field and the source of this
module, of tasks/core/formatting.py and of tasks/core/rows.py (the canonical rows' reader). Moving
the data keeps the key; changing one byte, one option or the masking code changes it. The entry is
written to a scratch folder and renamed into place with a completion marker
(tasks/core/storage.atomic_directory); an incomplete or unreadable entry is rebuilt. Formatting and
masking live in tasks/core/formatting.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from typing import Any

from prefect import task

from schemas.config import TemplateOptions
from schemas.manifests import DataArtifact, ModelArtifact, TokenizedArtifact
from tasks.artifacts import publisher
from tasks.caching import content_cache_key
from tasks.core import formatting, hashing, storage
from tasks.core import rows as canonical
from tasks.core.collate import IGNORE_INDEX
from tasks.core.readers import DataValidationError
from tasks.core.rows import read_canonical
from tasks.retrying import retry_transient

logger = logging.getLogger(__name__)

STAGE = "tokenize-and-cache"
SPLITS = ("train", "eval")
DROP_REASONS = ("too_long", "no_loss_tokens")
STATS_FILE = "stats.json"
CHUNK = 4096  # rows per batched tokenizer call


class TokenizeError(DataValidationError):
    """Tokenizing left a split that training or evaluation cannot use (every row dropped)."""


def tokenize_entry(
    data: DataArtifact, model: ModelArtifact, options: TemplateOptions, cache_dir: str
) -> tuple[str, str]:
    """(key, url) of the tokenized entry: a hash of content, never of a path."""
    key = hashing.hash_parts(data.key, model.tokenizer_hash, options.model_dump(mode="json"), CODE_VERSION)
    return key, storage.join(cache_dir, "tokenized", key)


def tokenize_dataset(
    data: DataArtifact,
    model: ModelArtifact,
    options: TemplateOptions,
    cache_dir: str,
    cache_storage_options: dict[str, Any] | None = None,
) -> TokenizedArtifact:
    """Tokenize the validated rows with token-exact loss masks, or reuse the entry under their key.
    `cache_storage_options` reach every read and write under `cache_dir` (never the key)."""
    started = time.perf_counter()
    cache = cache_storage_options
    key, url = tokenize_entry(data, model, options, cache_dir)
    if storage.is_complete(url, cache):
        stats = read_entry(url, cache)
        if stats is not None:
            logger.info("tokenize: reusing %s (%.2f s)", url, time.perf_counter() - started)
            return TokenizedArtifact(stage=STAGE, uri=url, key=key, stats=stats, store_hit=True)
        logger.warning("tokenize: entry %s is unreadable; rebuilding it", url)
    rebuild = storage.exists(url, cache)  # a half-written or corrupt entry is replaced, a finished one never
    tokenizer = formatting.load_tokenizer(storage.local_copy(model.uri, cache))
    datasets_by_split, stats = build_splits(list(read_canonical(data.uri, cache)), tokenizer, options)
    require_rows(stats, options)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    publish_entry(url, datasets_by_split, stats, replace=rebuild, storage_options=cache)
    logger.info("tokenize: wrote %s in %.2f s", url, stats["seconds"])
    return TokenizedArtifact(stage=STAGE, uri=url, key=key, stats=stats, store_hit=False)


def build_splits(rows: list[dict[str, Any]], tokenizer, options: TemplateOptions) -> tuple[dict, dict[str, Any]]:
    """Encode the rows (batched, CHUNK rows per tokenizer call); per split a Dataset of the kept
    rows and its statistics. Each chunk goes to compact Arrow arrays at once, so memory stays
    proportional to the tokens, not to Python objects per token."""
    import datasets
    import pyarrow as pa

    ids_type = pa.list_(pa.int32())
    arrays = {split: {"input_ids": [], "labels": [], "length": []} for split in SPLITS}
    results_by_split: dict[str, list] = {split: [] for split in SPLITS}
    for begin in range(0, len(rows), CHUNK):
        chunk = rows[begin : begin + CHUNK]
        sources = [row.get("source") or f"row {begin + i}" for i, row in enumerate(chunk)]
        tools = [row.get("tools") for row in chunk]
        results = formatting.encode_batch([row["messages"] for row in chunk], tokenizer, options, sources, tools)
        for split in SPLITS:
            chosen = [result for row, result in zip(chunk, results) if row.get("split", "train") == split]
            kept = [result for result in chosen if isinstance(result, formatting.EncodedExample)]
            arrays[split]["input_ids"].append(pa.array([example.input_ids for example in kept], type=ids_type))
            arrays[split]["labels"].append(pa.array([example.labels for example in kept], type=ids_type))
            arrays[split]["length"].append(pa.array([len(example.input_ids) for example in kept], type=pa.int32()))
            results_by_split[split].append(split_stats(chosen))
    splits, stats = {}, {"template": formatting.template_kind(tokenizer, options), "rendering": formatting.rendering_summary(tokenizer, options)}
    for split in SPLITS:
        columns = {name: pa.chunked_array(chunks, type=ids_type if name != "length" else pa.int32())
                   for name, chunks in arrays[split].items()}
        # An explicit fingerprint skips datasets' dill-based hashing of the in-memory table: it is
        # slow, and under Prefect's log_prints it dumps bytecode into the run log.
        splits[split] = datasets.Dataset(pa.table(columns), fingerprint=uuid.uuid4().hex)
        stats[split] = merge_stats(results_by_split[split])
    return splits, stats


def split_stats(results: list) -> dict[str, Any]:
    """Counts for one split (or one chunk of it)."""
    kept = [result for result in results if isinstance(result, formatting.EncodedExample)]
    lengths = [len(example.input_ids) for example in kept]
    dropped = {reason: 0 for reason in DROP_REASONS}
    for result in results:
        if isinstance(result, formatting.Dropped):
            dropped[result.reason] += 1
    return {
        "rows": len(results),
        "kept": len(kept),
        "dropped": dropped,
        "truncated": sum(example.truncated for example in kept),
        "reasoning_dropped": sum(result.reasoning_dropped for result in results),
        "control_text": sum(result.control_text for result in results),
        "tokens": sum(lengths),
        "loss_tokens": sum(len(example.labels) - example.labels.count(IGNORE_INDEX) for example in kept),
        "max_length": max(lengths, default=0),
        "longest_dropped": max((result.length for result in results if isinstance(result, formatting.Dropped)), default=0),
    }


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Chunk counts -> split statistics, with the loss fraction and mean length."""
    summed = ("rows", "kept", "truncated", "reasoning_dropped", "control_text", "tokens", "loss_tokens")
    total = {name: sum(part[name] for part in parts) for name in summed}
    tokens, kept = total["tokens"], total["kept"]
    return {
        "rows": total["rows"],
        "kept": kept,
        "dropped": {reason: sum(part["dropped"][reason] for part in parts) for reason in DROP_REASONS},
        "truncated": total["truncated"],
        "reasoning_dropped": total["reasoning_dropped"],  # reasoning the template cannot show (template.reasoning 'drop')
        "control_text": total["control_text"],  # control-token strings in the data, kept as plain text
        "tokens": tokens,
        "loss_tokens": total["loss_tokens"],
        "loss_fraction": round(total["loss_tokens"] / tokens, 4) if tokens else 0.0,
        "max_length": max((part["max_length"] for part in parts), default=0),
        "mean_length": round(tokens / kept, 1) if kept else 0.0,
        "longest_dropped": max((part["longest_dropped"] for part in parts), default=0),
    }


def require_rows(stats: dict[str, Any], options: TemplateOptions) -> None:
    """Refuse an empty train split, or an empty eval split where there were eval rows: training
    would stop on an empty store, and evaluation would have no loss to report."""
    if not stats["train"]["kept"]:
        raise TokenizeError(_empty_split_message("train", stats["train"], options))
    if stats["eval"]["rows"] and not stats["eval"]["kept"]:
        raise TokenizeError(_empty_split_message("eval", stats["eval"], options) + " (or leave the eval rows out)")


def _empty_split_message(split: str, figures: dict[str, Any], options: TemplateOptions) -> str:
    dropped, longest = figures["dropped"], figures["longest_dropped"]
    fixes = []
    if longest > options.max_length:
        fixes.append(f"--template.max_length {longest}")
        if options.truncation == "drop":
            fixes.append("--template.truncation truncate_response")
    fix = " or ".join(fixes) or "check that the chat template renders the assistant turns"
    return (
        f"no {split} rows left after tokenizing: all {figures['rows']} were dropped, {dropped['too_long']} longer than "
        f"template.max_length={options.max_length} tokens and {dropped['no_loss_tokens']} with no response token left to learn from "
        f"(the longest has {longest} tokens). To keep them: {fix}"
    )


def publish_entry(url: str, splits: dict, stats: dict[str, Any], replace: bool, storage_options: dict[str, Any] | None = None) -> None:
    """Write the DatasetDict and stats.json to scratch and rename them into place.

    Two runs building the same key both write complete, identical entries: with replace=False the
    second one finds the first published and discards its own copy."""
    import datasets

    try:
        with storage.atomic_directory(url, storage_options, replace=replace) as scratch:
            empty = {name: 1 for name, split in splits.items() if split.num_rows == 0}  # 0 shards would not load
            datasets.DatasetDict(splits).save_to_disk(str(scratch), num_shards=empty or None)
            (scratch / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    except OSError:
        # Two rebuilds racing on one key: the other one's swap can make ours fail; its entry is fine.
        if read_entry(url, storage_options) is None:
            raise


def read_entry(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The entry's statistics, or None when it cannot be loaded or does not match them."""
    import datasets

    try:
        stats = storage.read_json(storage.join(url, STATS_FILE), storage_options)
        loaded = datasets.load_from_disk(url, storage_options=storage_options or None)
        for split in SPLITS:
            columns = set(loaded[split].column_names)
            if loaded[split].num_rows != stats[split]["kept"] or columns != {"input_ids", "labels", "length"}:
                return None
        return stats
    except Exception as error:  # noqa: BLE001 - any failure to read means: rebuild
        logger.warning("tokenize: cannot read %s: %s", url, error)
        return None


# rows.py: its reader of the canonical JSONL decides what gets tokenized.
CODE_VERSION = hashing.code_version(sys.modules[__name__], formatting, canonical)


@task(
    name=STAGE,
    cache_key_fn=content_cache_key(tokenize_entry, "cache_storage_options"),
    persist_result=True,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[2, 10],
)
def tokenize_task(
    data: DataArtifact,
    model: ModelArtifact,
    options: TemplateOptions,
    cache_dir: str,
    cache_storage_options: dict[str, Any] | None = None,
) -> TokenizedArtifact:
    result = tokenize_dataset(data, model, options, cache_dir, cache_storage_options)
    publish_tokenize_stats(result)
    return result


@publisher("tokenize statistics")
def publish_tokenize_stats(result: TokenizedArtifact) -> None:
    """A Prefect table of the per-split statistics."""
    from prefect.artifacts import create_table_artifact

    table = []
    for split in SPLITS:
        figures = dict(result.stats[split])
        dropped = figures.pop("dropped")
        table.append({"split": split, **figures, **{f"dropped_{reason}": n for reason, n in dropped.items()}})
    create_table_artifact(
        table=table,
        key="tokenize-stats",
        description=f"Tokenized {result.uri} ({result.stats.get('template')} template, cache hit: {result.store_hit})",
    )
