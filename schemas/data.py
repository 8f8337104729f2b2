"""The pandera schemas of the input data: the one place where every format's columns are declared,
together with the checks each row must pass before anything is tokenized.

Each check is a *finder*: it returns None for a good value and a one-line reason for a bad one.
pandera runs `finder(value) is None` on every row; the validate stage calls the same finder again
on the failing values to say exactly what is wrong (which turn, which type, how long)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pandas as pd
import pandera.pandas as pa

Finder = Callable[[Any], "str | None"]

ROLES = ("system", "user", "assistant")
TOO_LONG = "too_long"
NULL = "not_nullable"  # pandera's own name for its null check
MISSING_COLUMN = "column_in_dataframe"  # pandera's own name for a missing required column


@dataclass(frozen=True)
class TurnFormat:
    """A column holding a conversation: a list of objects with a role key and a text key."""

    role_key: str
    content_key: str
    roles: dict[str, str]  # the data's role name -> ours


@dataclass(frozen=True)
class RecordFormat:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    turns: TurnFormat | None = None  # set for conversation formats (one required column)

    @property
    def columns(self) -> tuple[str, ...]:
        return self.required + self.optional


CHAT_TURNS = TurnFormat("role", "content", {role: role for role in ROLES})
SHAREGPT_TURNS = TurnFormat("from", "value", {"system": "system", "human": "user", "gpt": "assistant"})

# Order matters for detection: the first format whose required columns are all present wins.
FORMATS: dict[str, RecordFormat] = {
    "chat": RecordFormat("chat", ("messages",), turns=CHAT_TURNS),
    "sharegpt": RecordFormat("sharegpt", ("conversations",), turns=SHAREGPT_TURNS),
    "alpaca": RecordFormat("alpaca", ("instruction", "output"), optional=("input", "system")),
    "prompt_completion": RecordFormat("prompt_completion", ("prompt", "completion")),
}


def detect_format(columns: Iterable[str]) -> str | None:
    """The format whose required columns are all present; failing that, the first one that has
    some of them, so a missing column is reported against the format the data most looks like."""
    present = set(columns)
    for name, record in FORMATS.items():
        if present.issuperset(record.required):
            return name
    for name, record in FORMATS.items():
        if present.intersection(record.required):
            return name
    return None


# --- finders -----------------------------------------------------------------------------------


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def not_a_string(value: Any) -> str | None:
    if isinstance(value, str):
        return None
    return f"expected a string, got {type(value).__name__} {_preview(value)}"


def not_optional_text(value: Any) -> str | None:
    # Optional columns: None is a missing value; a float NaN (Parquet, pandas) is not text either.
    return None if value is None else not_a_string(value)


def empty_text(value: Any) -> str | None:
    # Non-strings pass here: `not_a_string` reports them, once.
    if isinstance(value, str) and not value.strip():
        return "empty or whitespace-only text"
    return None


def _turns_finders(turns: TurnFormat) -> dict[str, Finder]:
    role_key, content_key = turns.role_key, turns.content_key
    allowed = "/".join(turns.roles)

    def is_turn_list(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(turn, dict) for turn in value)

    def not_a_turn_list(value: Any) -> str | None:
        if is_turn_list(value) and value:
            return None
        return f"expected a non-empty list of {{{role_key}, {content_key}}} objects, got {_preview(value)}"

    def bad_role(value: Any) -> str | None:
        for index, turn in enumerate(value if is_turn_list(value) else []):
            if turn.get(role_key) not in turns.roles:
                return f"turn {index}: {role_key} {_preview(turn.get(role_key))} is not one of {allowed}"
        return None

    def bad_content(value: Any) -> str | None:
        for index, turn in enumerate(value if is_turn_list(value) else []):
            problem = not_a_string(turn.get(content_key)) or empty_text(turn.get(content_key))
            if problem:
                return f"turn {index}: {content_key}: {problem}"
        return None

    def no_assistant_turn(value: Any) -> str | None:
        if not is_turn_list(value) or not value:
            return None  # reported by not_a_turn_list
        if any(turns.roles.get(turn.get(role_key)) == "assistant" for turn in value):
            return None
        assistant = next(name for name, ours in turns.roles.items() if ours == "assistant")
        return f"no {assistant} turn: nothing to learn from"

    return {
        "not_a_turn_list": not_a_turn_list,
        "bad_role": bad_role,
        "bad_content": bad_content,
        "no_assistant_turn": no_assistant_turn,
    }


def column_finders(record: RecordFormat, column: str) -> dict[str, Finder]:
    """The checks of one column, by check name."""
    if record.turns is not None:
        return _turns_finders(record.turns)
    if column in record.required:
        return {"not_a_string": not_a_string, "empty": empty_text}
    return {"not_a_string": not_optional_text}  # optional text (alpaca input/system) may be empty or missing


# --- length ------------------------------------------------------------------------------------


def _text_length(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def _turns_length(turns: TurnFormat) -> Callable[[Any], int]:
    def length(value: Any) -> int:
        if not isinstance(value, list):
            return 0
        return sum(_text_length(turn.get(turns.content_key)) for turn in value if isinstance(turn, dict))

    return length


def row_chars(frame: pd.DataFrame, record: RecordFormat) -> pd.Series:
    """Characters of text in each row (all text columns, or all turns' contents)."""
    length = _turns_length(record.turns) if record.turns else _text_length
    total = pd.Series(0, index=frame.index, dtype="int64")
    for column in record.columns:
        if column in frame.columns:
            total = total + frame[column].map(length).astype("int64")
    return total


# --- the schema --------------------------------------------------------------------------------


def _element_check(name: str, finder: Finder, ignore_na: bool) -> pa.Check:
    return pa.Check(lambda value: finder(value) is None, element_wise=True, name=name, ignore_na=ignore_na)


def record_schema(format_name: str, max_chars: int) -> pa.DataFrameSchema:
    """The pandera schema of one input format. Columns hold raw Python values (dtype object): type
    checks are per row, so a number in row 7 is reported as row 7, not as a column dtype."""
    record = FORMATS[format_name]
    columns = {
        column: pa.Column(
            None,
            required=column in record.required,
            nullable=column not in record.required,
            # pandera skips nulls (None and NaN alike) by default. An optional column's finder must
            # see a float NaN to refuse it (it lets None through); a required column's null is
            # pandera's own not_nullable failure, reported once.
            checks=[
                _element_check(name, finder, ignore_na=column in record.required)
                for name, finder in column_finders(record, column).items()
            ],
        )
        for column in record.columns
    }
    too_long = pa.Check(lambda frame: row_chars(frame, record) <= max_chars, name=TOO_LONG)
    return pa.DataFrameSchema(columns, checks=[too_long], strict=False, coerce=False)


def explain(format_name: str, column: str | None, check: str, value: Any, max_chars: int) -> str:
    """One line saying why a value failed a check of `record_schema`."""
    if check == NULL:
        return "missing value (null)"
    if check == TOO_LONG:
        return f"row has {value} characters of text, more than max_chars={max_chars}"
    finder = column_finders(FORMATS[format_name], column or "").get(check)
    return (finder(value) if finder else None) or check
