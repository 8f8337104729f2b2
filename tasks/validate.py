"""validate-data: read the data wherever it lives, map every format onto the canonical rows, and
reject or report every bad row (pandera, `schemas/data.py`) before anything is tokenized.

Reading the files is `tasks/core/readers.py`; the canonical row, its split and its JSONL file are
`tasks/core/rows.py`. This module checks rows, reports and publishes. The entry
`cache_dir/validated/<key>/` holds `data.jsonl` (one canonical row a line) and `report.json`. The
key hashes the input bytes, the options and the code that shapes the rows; the artifact's own key
is the hash of the rows' text and split (not their `source` labels), which is what later stages
cache on.

Nothing is dropped silently: besides the invalid rows, the report counts what the valid rows held
that the canonical rows do not carry (`unused_fields`: columns no format reads, keys inside a turn,
a call or a tool definition), the turns after the last turn that can carry loss (`trailing_turns`)
and the turns read by kind (`turns`)."""

from __future__ import annotations

import json
import logging
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pandera.pandas as pa
from prefect import task

import schemas.data as data_schema
from schemas.config import DataOptions
from schemas.manifests import DataArtifact
from tasks.artifacts import publisher
from tasks.caching import content_cache_key, ensure_record_matches
from tasks.core import readers, storage
from tasks.core import rows as canonical
from tasks.core.hashing import code_version, hash_bytes, hash_parts
from tasks.core.readers import (  # DataValidationError stays importable from here (flows, tests)
    DataValidationError, FileProblem, LoadedFile, Source, hash_stream, load_source, read_source, resolve_sources,
)
from tasks.core.rows import Row, assign_splits, content_key, eval_in_train, find_duplicates, write_canonical
from tasks.retrying import retry_transient

STAGE = "validate-data"
# Every module whose code changes the validated rows: readers parse them, rows splits and writes them.
CODE_VERSION = code_version(sys.modules[__name__], data_schema, readers, canonical)
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


def _hub_hash(source: Source) -> str:
    return hash_parts("hub", source.url, source.hub_split)  # a hub dataset is keyed by its id and split


def _source_hash(source: Source, raw: bytes | None) -> str:
    return _hub_hash(source) if source.hub_split else hash_bytes(raw)


def _entry(sources: list[Source], hashes: list[str], options: DataOptions, cache_dir: str) -> tuple[str, str]:
    # Credentials and endpoints say where the bytes are, not what they are: not part of the key.
    settings = options.model_dump(mode="json", exclude={"storage_options"})
    inputs = [[source.split, digest] for source, digest in zip(sources, hashes)]
    key = hash_parts(inputs, settings, CODE_VERSION)
    return key, storage.join(cache_dir, "validated", key)


def validate_entry(data: list[str], eval_data: list[str], options: DataOptions, cache_dir: str) -> tuple[str, str]:
    """(key, url) of the cache entry: the key hashes every input's bytes in order (a hub dataset:
    its id and split), the options and the code that shapes the rows (CODE_VERSION). Streams the
    files (Prefect's cache key)."""
    sources = _sources(data, eval_data, options)
    hashes = [_hub_hash(source) if source.hub_split else hash_stream(source, options.storage_options) for source in sources]
    return _entry(sources, hashes, options, cache_dir)


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
    objects = {row: value for row, value in enumerate(loaded.rows) if isinstance(value, dict)}
    if not objects:
        raise FileProblem(f"rows must be objects with named fields, row 0 is a {type(loaded.rows[0]).__name__}")
    frame = _rename(_frame(objects), options.column_mapping)
    format_name = options.format if options.format != "auto" else _detect(frame)
    not_objects = [
        _failure(loaded, row, "(row)", "not_an_object", f"expected an object with named fields, got {type(value).__name__}")
        for row, value in enumerate(loaded.rows)
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


# --- the stage ---------------------------------------------------------------------------------


def validate_data(
    data: list[str], eval_data: list[str], options: DataOptions, cache_dir: str, cache_storage_options: dict[str, Any] | None = None
) -> DataArtifact:
    """Read, check and canonicalise the data; publish data.jsonl + report.json under its key.
    `cache_storage_options` are the fsspec options of `cache_dir` (never part of the key)."""
    sources = _sources(data, eval_data, options)
    # Each file is read once: the key hashes exactly the bytes that are parsed, so a file that
    # changes during the run can never be stored under its old content's key.
    raws = [read_source(source, options.storage_options) for source in sources]
    key, url = _entry(sources, [_source_hash(source, raw) for source, raw in zip(sources, raws)], options, cache_dir)
    if storage.is_complete(url, cache_storage_options):
        return _artifact(url, storage.read_json(storage.join(url, "report.json"), cache_storage_options), store_hit=True)
    checked = _check_all(sources, raws, options, cache_dir, key, cache_storage_options)
    mapped = [canonical_rows(file) for file in checked]
    rows = [row for file_rows, _ in mapped for row in file_rows]
    usage = _usage(rows, sum((unused for _, unused in mapped), Counter()))
    duplicates = find_duplicates(rows)
    if options.dedupe:
        dropped = {id(duplicate) for duplicate, _ in duplicates}
        rows = [row for row in rows if id(row) not in dropped]
    assign_splits(rows, options.eval_fraction, has_eval_files=any(source.split == "eval" for source in sources))
    overlap = eval_in_train(rows)
    _warn_overlap(overlap, rows)
    report = _report(key, checked, rows, duplicates, overlap, usage, options)
    if not report["train_rows"]:
        raise DataValidationError(
            f"no training rows left: {report['rows_read']} read, dropped {report['dropped_by_reason']} (inputs: {', '.join(data)})"
        )
    return _publish(url, rows, report, cache_storage_options)


def _check_all(
    sources: list[Source], raws: list[bytes | None], options: DataOptions, cache_dir: str, key: str, cache_options: dict[str, Any] | None
) -> list[CheckedFile]:
    """Every file parsed and checked; raises once, naming every bad file and (policy 'fail') row."""
    checked, problems = [], []
    for i, source in enumerate(sources):
        raw, raws[i] = raws[i], None  # each file's bytes are dropped once its rows are parsed
        try:
            checked.append(check_file(load_source(source, raw), options))
        except FileProblem as exc:
            problems.append(f"{source.name}: {exc}")
    failures = [failure for file in checked for failure in file.failures]
    if problems or (failures and options.on_invalid == "fail"):
        rejected = failures if options.on_invalid == "fail" else []
        report = _failure_report(key, checked, problems, rejected, cache_dir, cache_options)
        raise DataValidationError(_error_message(problems, rejected, report))
    return checked


def _failure_report(
    key: str, checked: list[CheckedFile], problems: list[str], failures: list[RowFailure], cache_dir: str,
    cache_options: dict[str, Any] | None,
) -> str | None:
    if not failures:
        return None
    url = storage.join(cache_dir, "validation-reports", f"{key}.json")
    storage.write_json_atomic(url, {
        "key": key,
        "status": "failed",
        "files": _file_summaries(checked),
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


def _warn_overlap(overlap: list[tuple[Row, Row]], rows: list[Row]) -> None:
    if not overlap:
        return
    files = sorted({row.source.rsplit(":", 1)[0] for row, _ in overlap})
    logger.warning(
        "%d of %d eval row(s) are also training rows (same messages), from %s: the eval loss on them measures memorisation. "
        "Remove them from the eval data, or set data_options.dedupe to drop them (report.json lists them under eval_rows_in_train_rows)",
        len(overlap), sum(row.split == "eval" for row in rows), ", ".join(files),
    )


# --- report and publication --------------------------------------------------------------------


def _file_summaries(checked: list[CheckedFile]) -> list[dict[str, Any]]:
    return [
        {"file": file.loaded.source.name, "split": file.loaded.source.split, "format": file.format, "rows": len(file.loaded.rows)}
        for file in checked
    ]


def _dropped_by_reason(checked: list[CheckedFile]) -> dict[str, int]:
    """Each dropped row counted once, under its first failure."""
    counts: dict[str, int] = {}
    for file in checked:
        first: dict[int, str] = {}
        for failure in file.failures:
            first.setdefault(failure.row, failure.check)
        for reason in first.values():
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def _chars(rows: list[Row]) -> dict[str, float]:
    lengths = sorted(row.chars for row in rows)
    if not lengths:
        return {}
    return {
        "min": lengths[0],
        "max": lengths[-1],
        "mean": round(statistics.fmean(lengths), 1),
        "median": statistics.median(lengths),
        "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "total": sum(lengths),
    }


def _report(
    key: str, checked: list[CheckedFile], rows: list[Row], duplicates: list[tuple[Row, Row]], overlap: list[tuple[Row, Row]],
    usage: dict[str, Any], options: DataOptions,
) -> dict[str, Any]:
    dropped = _dropped_by_reason(checked)
    if options.dedupe and duplicates:
        dropped["duplicate"] = len(duplicates)
    return {
        "stage": STAGE,
        "key": key,
        "code_version": CODE_VERSION,
        "files": _file_summaries(checked),
        "rows_read": sum(len(file.loaded.rows) for file in checked),
        "rows_kept": len(rows),
        "train_rows": sum(row.split == "train" for row in rows),
        "eval_rows": sum(row.split == "eval" for row in rows),
        "eval_rows_in_train": len(overlap),
        "eval_rows_in_train_rows": [{"row": row.source, "same_as": trained.source} for row, trained in overlap],
        "rows_dropped": sum(dropped.values()),
        "dropped_by_reason": dropped,
        "duplicates": len(duplicates),
        "duplicates_dropped": options.dedupe,
        "duplicate_rows": [{"row": duplicate.source, "same_as": original.source} for duplicate, original in duplicates],
        "invalid_rows": [vars(failure) for file in checked for failure in file.failures],
        "chars": _chars(rows),
        **usage,
        "split_rule": "eval_data files" if any(f.loaded.source.split == "eval" for f in checked) else f"content hash < eval_fraction={options.eval_fraction}",
        "options": options.model_dump(mode="json", exclude={"storage_options"}),
    }


def _publish(url: str, rows: list[Row], report: dict[str, Any], cache_options: dict[str, Any] | None) -> DataArtifact:
    report["content_key"] = content_key(rows)
    with storage.atomic_directory(url, cache_options) as scratch:
        write_canonical(scratch / "data.jsonl", rows)
        (scratch / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("validated %s rows (%s train, %s eval), dropped %s", report["rows_kept"], report["train_rows"], report["eval_rows"], report["rows_dropped"])
    return _artifact(url, report, store_hit=False)


def _artifact(url: str, report: dict[str, Any], store_hit: bool) -> DataArtifact:
    return DataArtifact(
        stage=STAGE,
        uri=storage.join(url, "data.jsonl"),
        key=report["content_key"],
        report_uri=storage.join(url, "report.json"),
        stats={name: report[name] for name in STAT_FIELDS},
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


@task(
    name=STAGE,
    cache_key_fn=content_cache_key(validate_entry, "cache_storage_options"),
    persist_result=True,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[2, 10],
)
def validate_task(
    data: list[str], eval_data: list[str], options: DataOptions, cache_dir: str, cache_storage_options: dict[str, Any] | None = None
) -> DataArtifact:
    artifact = validate_data(data, eval_data, options, cache_dir, cache_storage_options)
    entry_url = artifact.uri.rsplit("/", 1)[0]  # <cache_dir>/validated/<key>/data.jsonl
    ensure_record_matches(entry_url.rsplit("/", 1)[-1], entry_url)
    publish_validation_table(artifact)
    return artifact
