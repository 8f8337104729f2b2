"""tokenize-and-cache: canonical rows -> Arrow DatasetDict(train, eval) of input_ids/labels/length.

The store is keyed by content: the validated data's key (DataArtifact.key: its rows' digests and
splits), the tokenizer's files and chat template (ModelArtifact.tokenizer_hash), every
TemplateOptions field and the source of this module, of tasks/core/formatting.py and of
tasks/core/rows.py. Moving the data keeps the key; changing one byte, one option or the masking
code changes it. Each validated shard is tokenized on its own (`tokenize_shard`, cached under
`cache_dir/tokenized-shards/<key>/`: every row, kept or why dropped), so a new shard of data costs
only its own tokens; `assemble` then streams the shards' kept rows into the store, one shard in
memory at a time. Entries are written to a scratch folder and renamed into place with a completion
marker (tasks/core/storage.atomic_directory); an incomplete or unreadable entry is rebuilt.
Formatting and masking live in tasks/core/formatting.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from schemas.config import DataOptions, TemplateOptions
from schemas.manifests import DataArtifact, ModelArtifact, ShardArtifact, TokenizedArtifact
from tasks import sharding
from tasks.artifacts import publisher
from tasks.core import formatting, hashing, storage
from tasks.core import rows as canonical
from tasks.core.collate import IGNORE_INDEX
from tasks.core.readers import DataValidationError
from tasks.core.rows import read_canonical
from tasks.retrying import cached_stage, retry_transient_shard
from tasks.sharding import ShardRunner

logger = logging.getLogger(__name__)

STAGE = "tokenize-and-cache"
SHARD_STAGE = "tokenize-shard"
SPLITS = ("train", "eval")
DROP_REASONS = ("too_long", "no_loss_tokens")
STATUS_KEPT, STATUS = 0, {"too_long": 1, "no_loss_tokens": 2}  # a shard row's status code, by drop reason
STATS_FILE = "stats.json"
TOKENS_FILE = "tokens.arrow"
CHUNK = 4096  # rows per batched tokenizer call
TOKEN_IDS = pa.list_(pa.int32())
STORE_SCHEMA = pa.schema({"input_ids": TOKEN_IDS, "labels": TOKEN_IDS, "length": pa.int32()})  # what training reads
STAT_COLUMNS = ["status", "length", "loss_tokens", "truncated", "reasoning_dropped", "control_text"]
SHARD_SCHEMA = pa.schema({
    **dict(zip(STORE_SCHEMA.names, STORE_SCHEMA.types)),
    "status": pa.int8(), "loss_tokens": pa.int32(), "truncated": pa.bool_(), "reasoning_dropped": pa.int32(), "control_text": pa.int32(),
})


class TokenizeError(DataValidationError):
    """Tokenizing left a split that training or evaluation cannot use (every row dropped)."""


@dataclass(frozen=True)
class RowsShard:
    """Canonical rows to tokenize as one unit: their JSONL file and the key of their content."""

    url: str
    key: str


def dataset_shards(data: DataArtifact, cache_options: dict[str, Any] | None = None) -> tuple[list[RowsShard], np.ndarray]:
    """The validated dataset's shards in order, and every row's DROPPED/TRAIN/EVAL code. A single
    canonical JSONL file (not a manifest) is one shard whose rows carry their own split."""
    if data.uri.endswith("/" + canonical.MANIFEST_FILE):
        manifest_shards, selection = canonical.read_selection(data.uri, cache_options)
        root = canonical.manifest_cache_root(data.uri)
        return [RowsShard(canonical.shard_rows_url(root, shard["key"]), shard["content_key"]) for shard in manifest_shards], selection
    codes = [canonical.SPLIT_CODES[row.get("split", "train")] for row in read_canonical(data.uri, cache_options)]
    return [RowsShard(data.uri, data.key)], np.array(codes, dtype=np.uint8)


def tokenize_entry(
    data: DataArtifact, model: ModelArtifact, options: TemplateOptions, cache_dir: str
) -> tuple[str, str]:
    """(key, url) of the tokenized entry: a hash of content, never of a path."""
    key = hashing.hash_parts(data.key, model.tokenizer_hash, options.model_dump(mode="json"), CODE_VERSION)
    return key, storage.join(cache_dir, "tokenized", key)


def shard_entry(shard: RowsShard, model: ModelArtifact, options: TemplateOptions, cache_dir: str) -> tuple[str, str]:
    """(key, url) of one shard's tokens: its rows' content, the tokenizer, the options, the code."""
    key = hashing.hash_parts("shard", shard.key, model.tokenizer_hash, options.model_dump(mode="json"), CODE_VERSION)
    return key, storage.join(cache_dir, "tokenized-shards", key)


def tokenize_dataset(
    data: DataArtifact,
    model: ModelArtifact,
    options: TemplateOptions,
    cache_dir: str,
    cache_storage_options: dict[str, Any] | None = None,
    workers: int = 1,
    runner: ShardRunner | None = None,
) -> TokenizedArtifact:
    """Tokenize the validated rows with token-exact loss masks, shard by shard (`workers` at a time,
    or on `runner`), and assemble the train/eval store; or reuse the store under their key.
    `cache_storage_options` reach every read and write under `cache_dir` (never the key)."""
    started = time.perf_counter()
    cache = cache_storage_options
    key, url = tokenize_entry(data, model, options, cache_dir)
    if storage.is_complete(url, cache):
        stats = read_entry(url, cache)
        if stats is not None:
            logger.info("tokenize: reusing %s (%.2f s)", url, time.perf_counter() - started)
            stats.setdefault("shards", {})["built"] = 0
            return TokenizedArtifact(stage=STAGE, uri=url, key=key, stats=stats, store_hit=True)
        logger.warning("tokenize: entry %s is unreadable; rebuilding it", url)
    rebuild = storage.exists(url, cache)  # a half-written or corrupt entry is replaced, a finished one never
    rows_shards, selection = dataset_shards(data, cache)
    done = [storage.is_complete(shard_entry(shard, model, options, cache_dir)[1], cache) for shard in rows_shards]
    work = sharding.Work(
        pending_bytes=sum(storage.size(shard.url, cache) for shard, finished in zip(rows_shards, done) if not finished),
        private=sharding.process_private(data.uri) or sharding.process_private(model.uri),
    )
    runner = runner or sharding.local_runner(workers, cache_dir)
    token_shards = runner(tokenize_shard, rows_shards, done, work, model=model, options=options, cache_dir=cache_dir, cache_storage_options=cache)
    stats = assemble(url, key, token_shards, selection, options, rebuild, cache)
    stats["shards"]["built"] = sum(not shard.store_hit for shard in token_shards)
    logger.info("tokenize: wrote %s in %.2f s (%d of %d shards tokenized)", url, time.perf_counter() - started,
                stats["shards"]["built"], len(token_shards))
    return TokenizedArtifact(stage=STAGE, uri=url, key=key, stats=stats, store_hit=False)


# --- one shard ---------------------------------------------------------------------------------


def tokenize_shard(
    shard: RowsShard, model: ModelArtifact, options: TemplateOptions, cache_dir: str, cache_storage_options: dict[str, Any] | None = None
) -> ShardArtifact:
    """Encode every row of one shard, CHUNK rows per tokenizer call, into an Arrow file: the tokens
    of the kept rows and, for every row, what the statistics count (kept or why dropped, lengths)."""
    key, url = shard_entry(shard, model, options, cache_dir)
    if storage.is_complete(url, cache_storage_options):
        return ShardArtifact(stage=SHARD_STAGE, uri=url, key=key, store_hit=True)
    tokenizer = _tokenizer(model, cache_storage_options)
    summary = {"template": formatting.template_kind(tokenizer, options), "rendering": formatting.rendering_summary(tokenizer, options)}
    with storage.atomic_directory(url, cache_storage_options, replace=True) as scratch:
        with pa.OSFile(str(scratch / TOKENS_FILE), "wb") as sink, pa.ipc.new_file(sink, SHARD_SCHEMA) as writer:
            summary["rows"] = 0
            for batch in _encoded_batches(read_canonical(shard.url, cache_storage_options), tokenizer, options):
                writer.write_batch(batch)
                summary["rows"] += batch.num_rows
        (scratch / STATS_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    logger.info("tokenize: %d rows of %s", summary["rows"], shard.url)
    return ShardArtifact(stage=SHARD_STAGE, uri=url, key=key, stats={"rows": summary["rows"]})


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(model: ModelArtifact, cache_options: dict[str, Any] | None):
    """The model's tokenizer, loaded once per process and tokenizer content: a process tokenizing
    twenty shards would otherwise grow by every copy the garbage collector has not freed yet."""
    if model.tokenizer_hash not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[model.tokenizer_hash] = formatting.load_tokenizer(storage.local_copy(model.uri, cache_options))
    return _TOKENIZERS[model.tokenizer_hash]


def _encoded_batches(rows: Iterator[dict[str, Any]], tokenizer, options: TemplateOptions) -> Iterator[pa.RecordBatch]:
    for number, chunk in enumerate(_chunks(rows, CHUNK)):
        sources = [row.get("source") or f"row {number * CHUNK + i}" for i, row in enumerate(chunk)]
        results = formatting.encode_batch([row["messages"] for row in chunk], tokenizer, options, sources, [row.get("tools") for row in chunk])
        yield _batch(results)


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _batch(results: list) -> pa.RecordBatch:
    """One record batch a chunk: dropped rows keep their place with no tokens, so that row i of
    the shard is row i of the validated shard whatever the tokenizer did."""
    kept = [isinstance(result, formatting.EncodedExample) for result in results]
    ids = [result.input_ids if keep else [] for result, keep in zip(results, kept)]
    labels = [result.labels if keep else [] for result, keep in zip(results, kept)]
    columns = {
        "input_ids": ids,
        "labels": labels,
        "length": [len(row) if keep else result.length for row, result, keep in zip(ids, results, kept)],
        "status": [STATUS_KEPT if keep else STATUS[result.reason] for result, keep in zip(results, kept)],
        "loss_tokens": [len(row) - row.count(IGNORE_INDEX) for row in labels],
        "truncated": [keep and result.truncated for result, keep in zip(results, kept)],
        "reasoning_dropped": [result.reasoning_dropped for result in results],
        "control_text": [result.control_text for result in results],
    }
    return pa.RecordBatch.from_pydict(columns, schema=SHARD_SCHEMA)


# --- the store ---------------------------------------------------------------------------------


def assemble(
    url: str, key: str, shards: list[ShardArtifact], selection: np.ndarray, options: TemplateOptions, replace: bool,
    cache_options: dict[str, Any] | None,
) -> dict[str, Any]:
    """Write the train/eval DatasetDict from the shards' kept rows (one shard in memory at a time)
    with its statistics, exactly those of one pass over every row."""
    summary = storage.read_json(storage.join(shards[0].uri, STATS_FILE), cache_options)
    stats: dict[str, Any] = {"template": summary["template"], "rendering": summary["rendering"]}
    parts: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    try:
        with storage.atomic_directory(url, cache_options, replace=replace) as scratch:
            writers, schemas = {}, {}
            for split in SPLITS:
                writers[split], schemas[split] = _split_writer(scratch, split, key)
            offset = 0
            for batch in _token_batches(shards, cache_options):
                codes = selection[offset : offset + batch.num_rows]
                offset += batch.num_rows
                kept = batch.column("status").to_numpy() == STATUS_KEPT
                for split in SPLITS:
                    chosen = codes == canonical.SPLIT_CODES[split]
                    parts[split].append(split_stats(batch.select(STAT_COLUMNS).filter(pa.array(chosen))))
                    rows = batch.select(STORE_SCHEMA.names).filter(pa.array(chosen & kept))
                    if rows.num_rows:
                        writers[split].write_batch(pa.RecordBatch.from_arrays(rows.columns, schema=schemas[split]))
            for writer in writers.values():
                writer.close()
            stats.update({split: merge_stats(parts[split]) for split in SPLITS}, shards={"total": len(shards)})
            require_rows(stats, options)
            (scratch / "dataset_dict.json").write_text(json.dumps({"splits": list(SPLITS)}))
            (scratch / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    except OSError:
        # Two rebuilds racing on one key: the other one's swap can make ours fail; its entry is fine.
        stats = read_entry(url, cache_options)
        if stats is None:
            raise
    return stats


def _token_batches(shards: list[ShardArtifact], cache_options: dict[str, Any] | None) -> Iterator[pa.RecordBatch]:
    """Every shard's record batches (CHUNK rows each) in order, read one at a time: memory holds
    one batch, whatever the shards hold."""
    for shard in shards:
        path = storage.local_copy(shard.uri, cache_options) / TOKENS_FILE
        with pa.OSFile(str(path)) as source:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                yield reader.get_batch(index)


def _split_writer(scratch: Path, split: str, key: str) -> tuple[pa.ipc.RecordBatchStreamWriter, pa.Schema]:
    """A split folder as `datasets.save_to_disk` writes it (its metadata written by datasets from an
    empty table), with a stream writer for the one Arrow file that the rows are appended to."""
    import datasets

    folder = scratch / split
    fingerprint = hashing.hash_parts(key, split)[:16]  # the same rows, the same bytes: no random fingerprint
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar for an empty table is noise in the run log
    try:
        datasets.Dataset(STORE_SCHEMA.empty_table(), fingerprint=fingerprint).save_to_disk(str(folder), num_shards=1)
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    data_file = folder / json.loads((folder / "state.json").read_text())["_data_files"][0]["filename"]
    with pa.memory_map(str(data_file)) as source:
        schema = pa.ipc.open_stream(source).schema  # with datasets' feature metadata
    return pa.ipc.new_stream(str(data_file), schema), schema


def split_stats(table: pa.RecordBatch) -> dict[str, Any]:
    """Counts for the rows of one split in one record batch (STAT_COLUMNS)."""
    status = table.column("status").to_numpy()
    lengths = table.column("length").to_numpy()
    kept = status == STATUS_KEPT
    return {
        "rows": table.num_rows,
        "kept": int(kept.sum()),
        "dropped": {reason: int((status == code).sum()) for reason, code in STATUS.items()},
        "truncated": int(pc.sum(table.column("truncated")).as_py() or 0),
        "reasoning_dropped": int(pc.sum(table.column("reasoning_dropped")).as_py() or 0),
        "control_text": int(pc.sum(table.column("control_text")).as_py() or 0),
        "tokens": int(lengths[kept].sum()),
        "loss_tokens": int(table.column("loss_tokens").to_numpy()[kept].sum()),
        "max_length": int(lengths[kept].max(initial=0)),
        "longest_dropped": int(lengths[~kept].max(initial=0)),
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


@task(**cached_stage(SHARD_STAGE, shard_entry, retry_condition=retry_transient_shard))
def tokenize_shard_task(
    shard: RowsShard, model: ModelArtifact, options: TemplateOptions, cache_dir: str, cache_storage_options: dict[str, Any] | None = None
) -> ShardArtifact:
    return tokenize_shard(shard, model, options, cache_dir, cache_storage_options)


@task(**cached_stage(STAGE, tokenize_entry))
def tokenize_task(
    data: DataArtifact,
    model: ModelArtifact,
    options: TemplateOptions,
    cache_dir: str,
    cache_storage_options: dict[str, Any] | None = None,
    data_options: DataOptions | None = None,
) -> TokenizedArtifact:
    """The stage; its shards are task runs of their own (tokenize-shard), placed by `data_options`
    (workers, dask_address), which are no part of the key."""
    runner = sharding.prefect_runner(tokenize_shard_task, data_options or DataOptions(), cache_dir)
    result = tokenize_dataset(data, model, options, cache_dir, cache_storage_options, runner=runner)
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
