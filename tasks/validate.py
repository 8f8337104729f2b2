"""validate-data: read the data wherever it lives, map every format onto the canonical rows, and
reject or report every bad row (pandera, `schemas/data.py`) before anything is tokenized.

Reading the files is `tasks/core/readers.py`, cutting them into shards `tasks/core/shards.py`; the
canonical row, its split and its JSONL file are `tasks/core/rows.py`. The work is done shard by
shard (`validate_shard`, each its own cache entry `cache_dir/validated-shards/<key>/`, keyed by
the shard's bytes, the options and the code that shapes rows), on whatever runner the caller gives
(tasks/sharding.py). `merge_shards` then makes them one dataset, `cache_dir/validated/<key>/`:
`manifest.json` (the shards in order), `selection.npy` (each row dropped, trained on or held out)
and `report.json`, decided on a 16-byte digest a row, so that the report, the duplicates and the
split are exactly what one pass over all rows gives. The artifact's key is the hash of the kept
rows' digests and splits (not their `source` labels), which is what later stages cache on.

Nothing is dropped silently: besides the invalid rows, the report counts what the valid rows held
that the canonical rows do not carry (`unused_fields`: columns no format reads, keys inside a turn,
a call or a tool definition), the turns after the last turn that can carry loss (`trailing_turns`)
and the turns read by kind (`turns`)."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pandera.pandas as pa
from prefect import task

import schemas.data as data_schema
from schemas.config import DataOptions
from schemas.manifests import DataArtifact, ShardArtifact
from tasks import sharding
from tasks.artifacts import publisher
from tasks.caching import ensure_record_matches
from tasks.core import readers, shards, storage
from tasks.core import rows as canonical
from tasks.core.hashing import code_version, hash_bytes, hash_parts
from tasks.core.readers import DataValidationError, FileProblem, LoadedFile, Source, resolve_sources  # noqa: F401 - flows, tests
from tasks.core.rows import (
    DIGEST_BYTES, DROPPED, EVAL, MANIFEST_FILE, SELECTION_FILE, SHARD_ROWS_FILE, SPLIT_CODES, TRAIN, Row, digest_fractions, hash_split,
    write_canonical,
)
from tasks.core.shards import ShardSpec
from tasks.retrying import cached_stage, retry_transient_shard
from tasks.sharding import ShardRunner

STAGE = "validate-data"
SHARD_STAGE = "validate-shard"
SHARD_FILE = "shard.json"
# Every module whose code changes the validated rows: readers parse them, shards cut the files and
# number their rows, rows splits and writes them.
CODE_VERSION = code_version(sys.modules[__name__], data_schema, readers, shards, canonical)
MESSAGE_ROWS = 20  # failing rows quoted in the error; the report file has all of them
STAT_FIELDS = (
    "rows_read", "rows_kept", "train_rows", "eval_rows", "eval_rows_in_train", "rows_dropped", "dropped_by_reason", "duplicates", "chars",
    "turns", "trailing_turns", "unused_fields",
)
TURN_KINDS = (*data_schema.ROLES, "tool_calls", "reasoning", "weight_0")
# pandera's check names, shortened to the reasons the report counts by
REASONS = {data_schema.NULL: "null"}

logger = logging.getLogger(__name__)


# --- keys --------------------------------------------------------------------------------------


def _sources(data: list[str], eval_data: list[str], options: DataOptions) -> list[Source]:
    return resolve_sources(data, eval_data, options.storage_options, options.hf_split)


def plan(data: list[str], eval_data: list[str], options: DataOptions) -> list[ShardSpec]:
    """Every input cut into shards (JSON Lines: `shard_rows` rows each), each keyed by its bytes."""
    return shards.plan_shards(_sources(data, eval_data, options), options.storage_options, options.shard_rows)


def shard_entry(spec: ShardSpec, options: DataOptions, cache_dir: str) -> tuple[str, str]:
    """(key, url) of one shard's validated rows: its bytes, where they sit in their file, the
    options that shape rows and the code that does (CODE_VERSION)."""
    key = hash_parts(spec.identity(), options.content_settings(), CODE_VERSION)
    return key, canonical.shard_url(cache_dir, key)


def _entry(shard_keys: list[str], cache_dir: str) -> tuple[str, str]:
    key = hash_parts("dataset", shard_keys)
    return key, canonical.dataset_url(cache_dir, key)


def validate_entry(data: list[str], eval_data: list[str], options: DataOptions, cache_dir: str) -> tuple[str, str]:
    """(key, url) of the dataset's entry (Prefect's cache key): the shards' keys in order. Streams
    the files once to hash them."""
    return _entry([shard_entry(spec, options, cache_dir)[0] for spec in plan(data, eval_data, options)], cache_dir)


# --- checking ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowFailure:
    file: str
    row: int  # 0-based, in the file
    line: int | None
    column: str
    check: str
    reason: str

    def message(self) -> str:
        line = f", line {self.line}" if self.line else ""
        return f"{self.file} row {self.row} (0-based){line}, column '{self.column}': {self.reason}"


@dataclass
class CheckedFile:
    loaded: LoadedFile
    format: str
    frame: pd.DataFrame
    failures: list[RowFailure] = field(default_factory=list)


def check_file(loaded: LoadedFile, options: DataOptions) -> CheckedFile:
    """Run the format's pandera schema on every row of one file (lazily: every failure at once)."""
    objects = {row: value for row, value in zip(loaded.row_numbers, loaded.rows) if isinstance(value, dict)}
    if not objects:
        raise FileProblem(f"rows must be objects with named fields, row {loaded.first_row} is a {type(loaded.rows[0]).__name__}")
    frame = _rename(_frame(objects), options.column_mapping)
    format_name = options.format if options.format != "auto" else _detect(frame)
    not_objects = [
        _failure(loaded, row, "(row)", "not_an_object", f"expected an object with named fields, got {type(value).__name__}")
        for row, value in zip(loaded.row_numbers, loaded.rows)
        if row not in objects
    ]
    failures = not_objects + _schema_failures(loaded, frame, format_name, options)
    # Row order; within a row, the column checks before the whole-row length check.
    failures.sort(key=lambda failure: (failure.row, failure.check == data_schema.TOO_LONG))
    return CheckedFile(loaded, format_name, frame, failures)


def _frame(objects: dict[int, dict[str, Any]]) -> pd.DataFrame:
    """One column per key (first-seen order), None where a row lacks the key: pandas would fill in
    NaN, which could not be told from a float NaN that a Parquet file really holds."""
    columns = dict.fromkeys(key for record in objects.values() for key in record)
    values = {column: [record.get(column) for record in objects.values()] for column in columns}
    return pd.DataFrame(values, index=list(objects), columns=list(columns), dtype=object)


def _rename(frame: pd.DataFrame, mapping: dict[str, str]) -> pd.DataFrame:
    clashes = [f"{old!r} -> {new!r}" for old, new in mapping.items() if old != new and {old, new} <= set(frame.columns)]
    if clashes:
        raise FileProblem(f"column_mapping {', '.join(clashes)}: the file already has a column by the new name")
    return frame.rename(columns=mapping)


def _detect(frame: pd.DataFrame) -> str:
    detected = data_schema.detect_format(frame.columns)
    if detected is None:
        expected = "; ".join(f"{' + '.join(record.required)} ({name})" for name, record in data_schema.FORMATS.items())
        raise FileProblem(
            f"cannot tell the format from the columns {sorted(map(str, frame.columns))}; expected {expected}. "
            "Set data_options.format, or rename columns with data_options.column_mapping"
        )
    return detected


def _schema_failures(loaded: LoadedFile, frame: pd.DataFrame, format_name: str, options: DataOptions) -> list[RowFailure]:
    try:
        # A fresh schema per file: it remembers the cells it read until the file is checked.
        data_schema.record_schema(format_name, options.max_chars).validate(frame, lazy=True)
        return []
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    file_wide = cases[cases["index"].isna()]
    if len(file_wide):
        raise FileProblem(_file_wide_message(file_wide, frame, format_name))
    record = data_schema.FORMATS[format_name]
    too_long = sorted(set(cases[cases["check"] == data_schema.TOO_LONG]["index"].astype(int)))
    lengths = data_schema.row_chars(frame.loc[too_long], record) if too_long else {}
    failures: dict[tuple[int, str, str], RowFailure] = {}
    for case in cases.itertuples(index=False):
        row, check = int(case.index), str(case.check)
        if check == data_schema.TOO_LONG:
            column, value = "+".join(c for c in record.columns if c in frame.columns), int(lengths[row])
        else:
            column, value = str(case.column), frame.at[row, case.column]
        reason = data_schema.explain(format_name, column, check, value, options.max_chars)
        failures.setdefault((row, column, check), _failure(loaded, row, column, REASONS.get(check, check), reason))
    return list(failures.values())


def _file_wide_message(cases: pd.DataFrame, frame: pd.DataFrame, format_name: str) -> str:
    missing = cases[cases["check"] == data_schema.MISSING_COLUMN]["failure_case"].tolist()
    if not missing:
        return "; ".join(f"{case.column}: {case.check}: {case.failure_case}" for case in cases.itertuples())
    required = ", ".join(data_schema.FORMATS[format_name].required)
    return (
        f"missing column(s) {', '.join(map(repr, missing))}: the {format_name} format needs {required}; "
        f"the file has {sorted(map(str, frame.columns))}. Rename columns with data_options.column_mapping"
    )


def _failure(loaded: LoadedFile, row: int, column: str, check: str, reason: str) -> RowFailure:
    return RowFailure(loaded.source.name, row, loaded.line(row), column, check, reason)


# --- records onto canonical rows ---------------------------------------------------------------


@dataclass
class MappedRecord:
    """One valid record on the canonical row, and what it held that the row does not carry."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    unused: Counter[str]


def map_record(record: dict[str, Any], format_name: str) -> MappedRecord:
    """One validated record in its format -> canonical messages and tools, and its unused fields:
    columns no format reads (`column 'metadata'`) and keys inside a cell (`messages[].refusal`)."""
    record_format = data_schema.FORMATS[format_name]
    unused = Counter(
        f"column {column!r}" for column, value in record.items()
        if column not in record_format.columns and data_schema.has_value(value)
    )
    if record_format.turns is None:
        return MappedRecord(_text_messages(record, format_name), [], unused)
    column = record_format.turns_column
    conversation = data_schema.read_turns(record[column], record_format.turns, column)
    tools = data_schema.read_tools(record.get(data_schema.TOOLS_COLUMN))
    messages = conversation.value
    unused += conversation.unused + tools.unused
    system = record.get("system")  # ShareGPT's (LLaMA-Factory's) system column
    if "system" in record_format.columns and isinstance(system, str) and system.strip():
        if messages[0]["role"] == "system":
            unused["column 'system'"] += 1  # a system turn in the conversation wins, as in LLaMA-Factory
        else:
            messages.insert(0, {"role": "system", "content": system})
    return MappedRecord(messages, tools.value, unused)


def _text_messages(record: dict[str, Any], format_name: str) -> list[dict[str, Any]]:
    """alpaca and prompt/completion records: one user turn and one assistant turn."""
    if format_name == "prompt_completion":
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    prompt, extra, system = record["instruction"], record.get("input"), record.get("system")
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


def canonical_rows(checked: CheckedFile) -> tuple[list[Row], Counter[str]]:
    """The file's valid rows as canonical rows, and the unused fields counted over them."""
    bad = {failure.row for failure in checked.failures}
    source = checked.loaded.source
    rows, unused = [], Counter()
    for row, record in zip(checked.frame.index, checked.frame.to_dict("records")):
        if row in bad:
            continue
        mapped = map_record(record, checked.format)
        rows.append(Row(mapped.messages, source.split, f"{source.name}:{row}", mapped.tools))
        unused += mapped.unused
    return rows, unused


def turn_counts(rows: list[Row]) -> dict[str, int]:
    """Turns of each role, and tool calls, reasoning texts and weight-0 assistant turns in them."""
    counts = dict.fromkeys(TURN_KINDS, 0)
    for row in rows:
        for message in row.messages:
            counts[message["role"]] += 1
            counts["tool_calls"] += len(message.get("tool_calls", ()))
            counts["reasoning"] += "reasoning" in message
            counts["weight_0"] += message.get("weight") == 0
    return counts


def trailing_turns(messages: list[dict[str, Any]]) -> int:
    """Turns after the last assistant turn that can carry loss: they teach nothing. They stay in
    the row (the row's content key must not move), and the report counts them."""
    carrying = [index for index, message in enumerate(messages) if message["role"] == "assistant" and message.get("weight") != 0]
    return len(messages) - 1 - carrying[-1] if carrying else len(messages)


def _usage(rows: list[Row], unused: Counter[str]) -> dict[str, Any]:
    """What the valid rows read hold (before dedupe): turns by kind, trailing turns, unused fields."""
    return {
        "turns": turn_counts(rows),
        "trailing_turns": sum(trailing_turns(row.messages) for row in rows),
        "unused_fields": dict(sorted(unused.items())),
    }


# --- one shard ---------------------------------------------------------------------------------


def validate_shard(
    spec: ShardSpec, options: DataOptions, cache_dir: str, cache_storage_options: dict[str, Any] | None = None
) -> ShardArtifact:
    """Check and canonicalise one shard; publish its rows, their compact index and its summary.

    A shard that cannot be read at all, or holds invalid rows, is published too (what is wrong
    with given bytes never changes): the dataset step reports every shard's problems at once."""
    key, url = shard_entry(spec, options, cache_dir)
    if storage.is_complete(url, cache_storage_options):  # the dataset step reads its summary
        return ShardArtifact(stage=SHARD_STAGE, uri=url, key=key, store_hit=True)
    summary = {"file": spec.source.name, "split": spec.source.split, "first_row": spec.row_start, "format": None, "rows_read": 0,
               "problem": None, "failures": []}
    rows: list[Row] = []
    try:
        checked = check_file(shards.read_shard(spec, options.storage_options), options)
    except FileProblem as exc:
        summary["problem"] = f"{spec.source.name}: {exc}"
    else:
        rows, unused = canonical_rows(checked)
        summary.update(
            format=checked.format, rows_read=len(checked.loaded.rows), failures=[vars(failure) for failure in checked.failures],
            dropped_by_reason=_dropped_by_reason(checked.failures), **_usage(rows, unused),
        )
    summary.update(valid_rows=len(rows), content_key=hash_bytes(b"".join(row.digest for row in rows)))
    with storage.atomic_directory(url, cache_storage_options) as scratch:
        write_canonical(scratch / SHARD_ROWS_FILE, rows)
        _write_index(scratch, rows)
        (scratch / SHARD_FILE).write_text(json.dumps(summary, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("validated %s rows %d-%d: %d valid", spec.source.name, spec.row_start, spec.row_start + summary["rows_read"] - 1, len(rows))
    return _shard_artifact(url, key, summary, store_hit=False)


def _write_index(folder: Path, rows: list[Row]) -> None:
    """What the dataset step needs of every row, 32 bytes a row: its digest, file row and length."""
    np.save(folder / "digests.npy", np.array([row.digest for row in rows], dtype=f"S{DIGEST_BYTES}"))
    np.save(folder / "file_rows.npy", np.array([int(row.source.rsplit(":", 1)[1]) for row in rows], dtype=np.int64))
    np.save(folder / "chars.npy", np.array([row.chars for row in rows], dtype=np.int64))


def _read_index(url: str, cache_options: dict[str, Any] | None) -> dict[str, np.ndarray]:
    index = {}
    for name in ("digests", "file_rows", "chars"):
        with fsspec.open(storage.join(url, f"{name}.npy"), "rb", **(cache_options or {})) as handle:
            index[name] = np.load(handle)
    return index


def _shard_artifact(url: str, key: str, summary: dict[str, Any], store_hit: bool) -> ShardArtifact:
    stats = {name: summary[name] for name in ("file", "split", "format", "rows_read", "valid_rows", "content_key")}
    return ShardArtifact(stage=SHARD_STAGE, uri=url, key=key, stats=stats, store_hit=store_hit)


# --- the stage ---------------------------------------------------------------------------------


def validate_data(
    data: list[str], eval_data: list[str], options: DataOptions, cache_dir: str, cache_storage_options: dict[str, Any] | None = None,
    workers: int = 1, runner: ShardRunner | None = None,
) -> DataArtifact:
    """Read, check and canonicalise the data, shard by shard, `workers` shards at a time (or on
    `runner`); publish the dataset's manifest and report under its key. `cache_storage_options`
    are the fsspec options of `cache_dir` (never part of any key)."""
    specs = plan(data, eval_data, options)
    entries = [shard_entry(spec, options, cache_dir) for spec in specs]
    key, url = _entry([shard_key for shard_key, _ in entries], cache_dir)
    if storage.is_complete(url, cache_storage_options):
        report = storage.read_json(storage.join(url, "report.json"), cache_storage_options)
        return _artifact(url, report, {"total": len(specs), "built": 0}, store_hit=True)
    runner = runner or sharding.local_runner(workers, cache_dir)
    done = [storage.is_complete(shard_url, cache_storage_options) for _, shard_url in entries]
    work = sharding.Work(
        pending_bytes=sum(spec.size for spec, finished in zip(specs, done) if not finished),
        private=any(sharding.process_private(spec.source.url) for spec in specs),
    )
    shard_results = runner(validate_shard, specs, done, work, options=options, cache_dir=cache_dir, cache_storage_options=cache_storage_options)
    return merge_shards(key, url, specs, shard_results, options, cache_dir, cache_storage_options)


def merge_shards(
    key: str, url: str, specs: list[ShardSpec], shard_results: list[ShardArtifact], options: DataOptions, cache_dir: str,
    cache_options: dict[str, Any] | None,
) -> DataArtifact:
    """The shards as one dataset: every problem at once, duplicates across shards (by digest), the
    hash split, the report exactly as one pass over all rows would make it."""
    summaries = [storage.read_json(storage.join(shard.uri, SHARD_FILE), cache_options) for shard in shard_results]
    _raise_problems(key, summaries, options, cache_dir, cache_options)
    indexes = [_read_index(shard.uri, cache_options) for shard in shard_results]
    digests = np.concatenate([index["digests"] for index in indexes])
    has_eval_files = any(spec.source.split == "eval" for spec in specs)
    source_splits = np.concatenate([np.full(len(index["digests"]), SPLIT_CODES[s["split"]], np.uint8) for index, s in zip(indexes, summaries)])
    first, same_as = _first_occurrences(digests)
    selection = _selection(digests, first, source_splits, options, has_eval_files)
    labels = _RowLabels(summaries, indexes)
    overlap = _eval_in_train(digests, selection)
    _warn_overlap([(labels[row], labels[same]) for row, same in overlap], int((selection == EVAL).sum()))
    report = _report(key, summaries, indexes, selection, first, same_as, overlap, labels, options, has_eval_files)
    if not report["train_rows"]:
        files = ", ".join(dict.fromkeys(summary["file"] for summary in summaries if summary["split"] == "train"))
        raise DataValidationError(
            f"no training rows left: {report['rows_read']} read, dropped {report['dropped_by_reason']} (inputs: {files})"
        )
    kept = selection != DROPPED
    report["content_key"] = hash_bytes(digests[kept].tobytes() + selection[kept].tobytes())  # what later stages key on
    shard_list = [{"key": shard.key, "content_key": s["content_key"], "rows": int(s["valid_rows"])} for shard, s in zip(shard_results, summaries)]
    _publish(url, shard_list, selection, report, cache_options)
    built = sum(not shard.store_hit for shard in shard_results)
    return _artifact(url, report, {"total": len(shard_results), "built": built}, store_hit=False)


def _selection(digests: np.ndarray, first: np.ndarray, source_splits: np.ndarray, options: DataOptions, has_eval_files: bool) -> np.ndarray:
    """DROPPED, TRAIN or EVAL for every valid row: duplicates dropped on request, then each row's
    file's split (eval files given) or its content hash's."""
    keep = first if options.dedupe else np.ones(len(digests), dtype=bool)
    selection = np.zeros(len(digests), dtype=np.uint8)
    if has_eval_files:
        selection[keep] = source_splits[keep]
    else:
        held = hash_split(digest_fractions(digests[keep]).tolist(), options.eval_fraction)
        selection[keep] = np.where(np.array(held, dtype=bool), EVAL, TRAIN)
    return selection


def _first_occurrences(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whether each row is the first with its digest, the index of that first row)."""
    _, first_index, inverse = np.unique(digests, return_index=True, return_inverse=True)
    same_as = first_index[inverse]
    return same_as == np.arange(len(digests)), same_as


def _eval_in_train(digests: np.ndarray, selection: np.ndarray) -> list[tuple[int, int]]:
    """(eval row, first training row with the same content) for every such eval row."""
    eval_rows = np.flatnonzero(selection == EVAL)
    train_rows = np.flatnonzero(selection == TRAIN)
    inside = np.isin(digests[eval_rows], digests[train_rows])
    if not inside.any():
        return []
    first_train: dict[bytes, int] = {}
    for row in train_rows[np.isin(digests[train_rows], digests[eval_rows[inside]])]:
        first_train.setdefault(digests[row], int(row))
    return [(int(row), first_train[digests[row]]) for row in eval_rows[inside]]


class _RowLabels:
    """`<file>:<row>` of a dataset row by its position, without a string per row."""

    def __init__(self, summaries: list[dict[str, Any]], indexes: list[dict[str, np.ndarray]]):
        self.files = [summary["file"] for summary in summaries]
        self.starts = np.cumsum([0] + [len(index["file_rows"]) for index in indexes])
        self.file_rows = indexes

    def __getitem__(self, position: int) -> str:
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        return f"{self.files[shard]}:{int(self.file_rows[shard]['file_rows'][position - self.starts[shard]])}"


def _raise_problems(key: str, summaries: list[dict[str, Any]], options: DataOptions, cache_dir: str, cache_options: dict[str, Any] | None) -> None:
    """Raise once, naming every bad file and (policy 'fail') row."""
    problems = [summary["problem"] for summary in summaries if summary["problem"]]
    failures = [RowFailure(**failure) for summary in summaries for failure in summary["failures"]]
    formats = {}
    for summary in summaries:
        if summary["format"] and formats.setdefault(summary["file"], summary["format"]) != summary["format"]:
            problems.append(f"{summary['file']}: rows from {summary['first_row']} look like {summary['format']}, earlier rows like "
                            f"{formats[summary['file']]}; set data_options.format")
    if problems or (failures and options.on_invalid == "fail"):
        rejected = failures if options.on_invalid == "fail" else []
        report = _failure_report(key, summaries, problems, rejected, cache_dir, cache_options)
        raise DataValidationError(_error_message(problems, rejected, report))


def _failure_report(
    key: str, summaries: list[dict[str, Any]], problems: list[str], failures: list[RowFailure], cache_dir: str,
    cache_options: dict[str, Any] | None,
) -> str | None:
    if not failures:
        return None
    url = storage.join(cache_dir, "validation-reports", f"{key}.json")
    storage.write_json_atomic(url, {
        "key": key,
        "status": "failed",
        "files": _file_summaries(summaries),
        "file_problems": problems,
        "invalid_rows": [vars(failure) for failure in failures],
    }, cache_options)
    return url


def _error_message(problems: list[str], failures: list[RowFailure], report_url: str | None) -> str:
    lines = list(problems)
    if failures:
        bad_rows = len({(failure.file, failure.row) for failure in failures})
        lines.append(f"{bad_rows} invalid row(s), {len(failures)} failure(s) (on_invalid='fail'); full list: {report_url}")
        lines += [f"  {failure.message()}" for failure in failures[:MESSAGE_ROWS]]
        if len(failures) > MESSAGE_ROWS:
            lines.append(f"  ... and {len(failures) - MESSAGE_ROWS} more in {report_url}")
    return "\n".join(lines)


def _warn_overlap(overlap: list[tuple[str, str]], eval_rows: int) -> None:
    if not overlap:
        return
    files = sorted({row.rsplit(":", 1)[0] for row, _ in overlap})
    logger.warning(
        "%d of %d eval row(s) are also training rows (same messages), from %s: the eval loss on them measures memorisation. "
        "Remove them from the eval data, or set data_options.dedupe to drop them (report.json lists them under eval_rows_in_train_rows)",
        len(overlap), eval_rows, ", ".join(files),
    )


# --- report and publication --------------------------------------------------------------------


def _file_summaries(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line a file (its shards added up), in input order."""
    files: dict[str, dict[str, Any]] = {}
    for summary in summaries:
        entry = files.setdefault(summary["file"], {"file": summary["file"], "split": summary["split"], "format": summary["format"], "rows": 0})
        entry["rows"] += summary["rows_read"]
    return [entry for entry in files.values() if entry["format"] is not None]


def _dropped_by_reason(failures: list[RowFailure]) -> dict[str, int]:
    """Each dropped row counted once, under its first failure."""
    first: dict[int, str] = {}
    for failure in failures:
        first.setdefault(failure.row, failure.check)
    return dict(Counter(first.values()))


def _chars(lengths: np.ndarray) -> dict[str, float]:
    """The same figures `statistics` gives on the sorted lengths (an int median for an odd count)."""
    if not len(lengths):
        return {}
    lengths = np.sort(lengths)
    middle = len(lengths) // 2
    median = int(lengths[middle]) if len(lengths) % 2 else (int(lengths[middle - 1]) + int(lengths[middle])) / 2
    total = int(lengths.sum())
    return {
        "min": int(lengths[0]),
        "max": int(lengths[-1]),
        "mean": round(total / len(lengths), 1),
        "median": median,
        "p95": int(lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]),
        "total": total,
    }


def _summed(summaries: list[dict[str, Any]], name: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for summary in summaries:
        counts.update(summary.get(name, {}))
    return dict(counts)


def _report(
    key: str, summaries: list[dict[str, Any]], indexes: list[dict[str, np.ndarray]], selection: np.ndarray, first: np.ndarray,
    same_as: np.ndarray, overlap: list[tuple[int, int]], labels: _RowLabels, options: DataOptions, has_eval_files: bool,
) -> dict[str, Any]:
    dropped = _summed(summaries, "dropped_by_reason")
    duplicates = np.flatnonzero(~first)
    if options.dedupe and len(duplicates):
        dropped["duplicate"] = len(duplicates)
    chars = np.concatenate([index["chars"] for index in indexes]) if indexes else np.array([], dtype=np.int64)
    turns = dict.fromkeys(TURN_KINDS, 0) | _summed(summaries, "turns")
    return {
        "stage": STAGE,
        "key": key,
        "code_version": CODE_VERSION,
        "files": _file_summaries(summaries),
        "rows_read": sum(summary["rows_read"] for summary in summaries),
        "rows_kept": int((selection != DROPPED).sum()),
        "train_rows": int((selection == TRAIN).sum()),
        "eval_rows": int((selection == EVAL).sum()),
        "eval_rows_in_train": len(overlap),
        "eval_rows_in_train_rows": [{"row": labels[row], "same_as": labels[same]} for row, same in overlap],
        "rows_dropped": sum(dropped.values()),
        "dropped_by_reason": dropped,
        "duplicates": len(duplicates),
        "duplicates_dropped": options.dedupe,
        "duplicate_rows": [{"row": labels[int(row)], "same_as": labels[int(same_as[row])]} for row in duplicates],
        "invalid_rows": [failure for summary in summaries for failure in summary["failures"]],
        "chars": _chars(chars[selection != DROPPED]),
        "turns": turns,
        "trailing_turns": sum(summary.get("trailing_turns", 0) for summary in summaries),
        "unused_fields": dict(sorted(_summed(summaries, "unused_fields").items())),
        "split_rule": "eval_data files" if has_eval_files else f"content hash < eval_fraction={options.eval_fraction}",
        "options": options.content_settings(),
    }


def _publish(url: str, shard_list: list[dict[str, Any]], selection: np.ndarray, report: dict[str, Any], cache_options: dict[str, Any] | None) -> None:
    with storage.atomic_directory(url, cache_options) as scratch:
        (scratch / MANIFEST_FILE).write_text(json.dumps({"shards": shard_list}, indent=1) + "\n")
        np.save(scratch / SELECTION_FILE, selection)
        (scratch / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("validated %s rows (%s train, %s eval), dropped %s", report["rows_kept"], report["train_rows"], report["eval_rows"], report["rows_dropped"])


def _artifact(url: str, report: dict[str, Any], shard_counts: dict[str, int], store_hit: bool) -> DataArtifact:
    return DataArtifact(
        stage=STAGE,
        uri=storage.join(url, MANIFEST_FILE),
        key=report["content_key"],
        report_uri=storage.join(url, "report.json"),
        stats={**{name: report[name] for name in STAT_FIELDS}, "shards": shard_counts},
        store_hit=store_hit,
    )


# --- Prefect -----------------------------------------------------------------------------------


def report_table(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The artifact's stats as rows of a Prefect table (nested counts flattened)."""
    rows = []
    for name, value in stats.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        rows += [{"measure": f"{name}.{part}" if part else name, "value": item} for part, item in items]
    return rows


@publisher("validation report")
def publish_validation_table(artifact: DataArtifact) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(table=report_table(artifact.stats), key="validation-report", description=f"Validation report: {artifact.report_uri}")


@task(**cached_stage(SHARD_STAGE, shard_entry, retry_condition=retry_transient_shard))
def validate_shard_task(
    spec: ShardSpec, options: DataOptions, cache_dir: str, cache_storage_options: dict[str, Any] | None = None
) -> ShardArtifact:
    return validate_shard(spec, options, cache_dir, cache_storage_options)


@task(**cached_stage(STAGE, validate_entry))
def validate_task(
    data: list[str], eval_data: list[str], options: DataOptions, cache_dir: str, cache_storage_options: dict[str, Any] | None = None
) -> DataArtifact:
    """The stage; its shards are task runs of their own (validate-shard), mapped over local worker
    processes or a Dask cluster (tasks/sharding.py)."""
    runner = sharding.prefect_runner(validate_shard_task, options, cache_dir)
    artifact = validate_data(data, eval_data, options, cache_dir, cache_storage_options, runner=runner)
    entry_url = artifact.uri.rsplit("/", 1)[0]  # <cache_dir>/validated/<key>/manifest.json
    ensure_record_matches(entry_url.rsplit("/", 1)[-1], entry_url)
    publish_validation_table(artifact)
    return artifact
