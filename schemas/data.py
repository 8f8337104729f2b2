"""The pandera schemas of the input data: the one place where every format's columns are declared,
together with the checks each row must pass before anything is tokenized.

Each check is a *finder*: it returns None for a good value and a one-line reason for a bad one.
pandera runs `finder(value) is None` on every row; the validate stage calls the same finder again
on the failing values to say exactly what is wrong (which turn, which type, how long).

Conversations (`chat`: OpenAI fine-tuning JSONL, `sharegpt`: LLaMA-Factory) are read by one reader,
`read_turns`, that both checks a cell and maps it onto the canonical messages of
`tasks/core/rows.py`: the checks and the mapping cannot disagree. A reason names the path inside the
row, e.g. `messages[3].tool_calls[0].function.arguments: not valid JSON (...)`.

* Roles: chat system/developer/user/assistant/tool ("developer" is read as system); ShareGPT
  system/human/gpt/function_call/observation. A function_call turn's value is the JSON of one call
  {"name", "arguments"} or of a list of them (parallel calls); it becomes an assistant turn with
  content "" and those calls. An observation is a tool turn.
* Content is a string or a list of text parts ({"type": "text", "text"|"value": str}, joined with
  ""); any other part (image_url, audio, ...) is refused. A tool result may also be any JSON value,
  written as JSON text. An assistant turn needs text or a tool call; every other turn needs text.
* A tool call needs a function name and arguments that are a JSON object (or a JSON string of one);
  a tool turn must answer an earlier call of its row: the call its tool_call_id names, or without
  an id the oldest call not answered yet. It takes that call's name when the call is known for
  sure: named by id, or the only call of its turn.
* `weight`/`loss_weight` of an assistant turn is 0 or 1 (true/false, 0.0/1.0 too); a row where every
  assistant turn has weight 0 has nothing to learn. `reasoning_content`/`reasoning`/`thinking` is
  the turn's reasoning text.
* `tools`: a list of function definitions, OpenAI's wrapped {"type": "function", "function": {...}}
  or bare {"name", "description", "parameters"}, or that list as a JSON string. Each needs a name;
  `parameters` must be a JSON object, and a definition without it is read as a function without
  arguments, {"type": "object", "properties": {}} (glaive data leaves it out for such functions).
* Whatever a cell holds that the canonical row does not carry (a key of a turn, a call or a tool
  definition) is counted in `Reading.unused` under a path like `messages[].refusal`: the report
  shows it, nothing is dropped silently."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pandas as pd
import pandera.pandas as pa

from tasks.core.rows import message_chars, tools_chars

Finder = Callable[[Any], "str | None"]

ROLES = ("system", "user", "assistant", "tool")  # the canonical roles
TOO_LONG = "too_long"
NULL = "not_nullable"  # pandera's own name for its null check
MISSING_COLUMN = "column_in_dataframe"  # pandera's own name for a missing required column

# The checks of a conversation column, each reporting the first problem of its kind in a row.
NOT_A_TURN_LIST = "not_a_turn_list"
BAD_ROLE = "bad_role"
BAD_CONTENT = "bad_content"
BAD_TOOL_CALL = "bad_tool_call"
TOOL_RESULT_WITHOUT_CALL = "tool_result_without_call"
BAD_WEIGHT = "bad_weight"
BAD_FIELD = "bad_field"  # reasoning, tool_call_id or name of the wrong type
NO_ASSISTANT_TURN = "no_assistant_turn"
NO_LOSS_TURN = "no_loss_turn"
TURN_CHECKS = (
    NOT_A_TURN_LIST, BAD_ROLE, BAD_CONTENT, BAD_TOOL_CALL, TOOL_RESULT_WITHOUT_CALL, BAD_WEIGHT, BAD_FIELD,
    NO_ASSISTANT_TURN, NO_LOSS_TURN,
)
BAD_TOOLS = "bad_tools"
TOOLS_COLUMN = "tools"

# Keys an assistant turn may carry besides its role and content; the first one given is read.
TOOL_CALLS_KEY = "tool_calls"
WEIGHT_KEYS = ("weight", "loss_weight")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


@dataclass(frozen=True)
class TurnFormat:
    """A column holding a conversation: a list of objects with a role key and a text key."""

    role_key: str
    content_key: str
    roles: dict[str, str]  # the data's role name -> ours
    call_roles: tuple[str, ...] = ()  # roles whose text is the JSON of their tool calls (ShareGPT function_call)

    @property
    def assistant_name(self) -> str:
        return next(name for name, ours in self.roles.items() if ours == "assistant")


@dataclass(frozen=True)
class RecordFormat:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    turns: TurnFormat | None = None  # set for conversation formats (their first required column)

    @property
    def columns(self) -> tuple[str, ...]:
        return self.required + self.optional

    @property
    def turns_column(self) -> str | None:
        return self.required[0] if self.turns else None


CHAT_TURNS = TurnFormat(
    "role", "content", {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
)
SHAREGPT_TURNS = TurnFormat(
    "from", "value",
    {"system": "system", "human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"},
    call_roles=("function_call",),
)

# Order matters for detection: the first format whose required columns are all present wins.
FORMATS: dict[str, RecordFormat] = {
    "chat": RecordFormat("chat", ("messages",), optional=(TOOLS_COLUMN,), turns=CHAT_TURNS),
    "sharegpt": RecordFormat("sharegpt", ("conversations",), optional=(TOOLS_COLUMN, "system"), turns=SHAREGPT_TURNS),
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


def _typed(value: Any) -> str:
    return f"{type(value).__name__} {_preview(value)}"


def not_a_string(value: Any) -> str | None:
    if isinstance(value, str):
        return None
    return f"expected a string, got {_typed(value)}"


def not_optional_text(value: Any) -> str | None:
    # Optional columns: None is a missing value; a float NaN (Parquet, pandas) is not text either.
    return None if value is None else not_a_string(value)


def empty_text(value: Any) -> str | None:
    # Non-strings pass here: `not_a_string` reports them, once.
    if isinstance(value, str) and not value.strip():
        return "empty or whitespace-only text"
    return None


def has_value(value: Any) -> bool:
    """Whether a field holds anything: None, NaN and empty text or containers hold nothing to lose."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, (str, list, dict)) and not value)


# --- reading conversations onto canonical messages ---------------------------------------------


@dataclass
class Reading:
    """One cell read onto its canonical value: as much of it as could be read, the first problem of
    each check (by check name) and how often each field the canonical row does not carry occurs."""

    value: list[dict[str, Any]] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    unused: Counter[str] = field(default_factory=Counter)

    def refuse(self, check: str, reason: str) -> None:
        self.problems.setdefault(check, reason)  # one reason per check and row: the first

    def count_unused(self, record: dict[str, Any], used: Iterable[str], path: str) -> None:
        used = set(used)
        self.unused.update(f"{path}.{key}" for key, value in record.items() if key not in used and has_value(value))


@dataclass(frozen=True)
class _Call:
    """A tool call waiting for its result."""

    id: str | None
    name: str | None
    alone: bool  # the only call of its turn: a result without an id surely answers it


def _is_turn_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(turn, dict) for turn in value)


def _looks_like_parts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(part, dict) and "type" in part for part in value)


def _first_given(record: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    return next(((key, record[key]) for key in keys if record.get(key) is not None), (None, None))


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"not valid JSON ({exc.msg} at char {exc.pos})"


class _TurnReader:
    """Reads one conversation cell turn by turn, keeping the calls still waiting for a result."""

    def __init__(self, turns: TurnFormat, column: str):
        self.turns, self.column = turns, column
        self.reading = Reading()
        self.waiting: list[_Call] = []  # oldest first

    def read(self, value: Any) -> Reading:
        if not _is_turn_list(value) or not value:
            keys = f"{{{self.turns.role_key}, {self.turns.content_key}}}"
            self.reading.refuse(NOT_A_TURN_LIST, f"expected a non-empty list of {keys} objects, got {_preview(value)}")
            return self.reading
        for index, turn in enumerate(value):
            message = self._turn(turn, f"{self.column}[{index}]")
            if message is not None:
                self.reading.value.append(message)
        self._check_loss()
        return self.reading

    def _turn(self, turn: dict[str, Any], path: str) -> dict[str, Any] | None:
        role_key, content_key = self.turns.role_key, self.turns.content_key
        data_role = turn.get(role_key)
        role = self.turns.roles.get(data_role) if isinstance(data_role, str) else None
        if role is None:
            allowed = "/".join(self.turns.roles)
            self.reading.refuse(BAD_ROLE, f"{path}.{role_key}: {_preview(data_role)} is not one of {allowed}")
            return None
        used = {role_key, content_key}
        if role == "assistant":
            message = self._assistant(turn, data_role, path, used)
        else:
            message = {"role": role, "content": self._text(turn.get(content_key), role, f"{path}.{content_key}")}
        if role == "tool":
            self._tool_result(turn, message, path, used)
        self.reading.count_unused(turn, used, f"{self.column}[]")
        return message

    # --- content

    def _text(self, raw: Any, role: str, path: str) -> str:
        text = self._content(raw, path, json_values=role == "tool")
        if text is not None and not text.strip():
            self.reading.refuse(BAD_CONTENT, f"{path}: empty or whitespace-only text")
        return text or ""

    def _content(self, raw: Any, path: str, json_values: bool) -> str | None:
        """The turn's text, or None when it cannot be read (the reason is recorded)."""
        if isinstance(raw, str):
            return raw
        if raw is None:
            self.reading.refuse(BAD_CONTENT, f"{path}: missing value (null)")
            return None
        if isinstance(raw, list) and (not json_values or _looks_like_parts(raw)):
            return self._parts(raw, path)
        if json_values:  # a tool's result given as data: the model reads it as JSON text
            return json.dumps(raw, ensure_ascii=False)
        self.reading.refuse(BAD_CONTENT, f"{path}: expected a string or a list of text parts, got {_typed(raw)}")
        return None

    def _parts(self, parts: list[Any], path: str) -> str | None:
        texts = [self._part_text(part, f"{path}[{index}]") for index, part in enumerate(parts)]
        return None if None in texts else "".join(texts)

    def _part_text(self, part: Any, path: str) -> str | None:
        if not isinstance(part, dict):
            self.reading.refuse(BAD_CONTENT, f"{path}: expected a text part {{type: text, text}}, got {_typed(part)}")
            return None
        kind = part.get("type", "text")
        if kind != "text":
            self.reading.refuse(BAD_CONTENT, f"{path}: {_preview(kind)} part: only text parts are supported")
            return None
        key, text = _first_given(part, ("text", "value"))  # OpenAI "text", LLaMA-Factory v1 "value"
        if not isinstance(text, str):
            self.reading.refuse(BAD_CONTENT, f"{path}.{key or 'text'}: expected a string, got {_typed(text)}")
            return None
        self.reading.count_unused(part, ("type", key), f"{self.column}[].{self.turns.content_key}[]")
        return text

    # --- assistant turns

    def _assistant(self, turn: dict[str, Any], data_role: str, path: str, used: set[str]) -> dict[str, Any]:
        content_path = f"{path}.{self.turns.content_key}"
        if data_role in self.turns.call_roles:
            text, calls = "", self._calls_in_text(turn.get(self.turns.content_key), content_path)
        else:
            used.add(TOOL_CALLS_KEY)
            raw_calls = turn.get(TOOL_CALLS_KEY)
            calls = self._tool_calls(raw_calls, f"{path}.{TOOL_CALLS_KEY}")
            text = self._assistant_text(turn.get(self.turns.content_key), has_value(raw_calls), content_path)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = calls
        reasoning = self._reasoning(turn, path, used)
        if reasoning:
            message["reasoning"] = reasoning
        weight = self._weight(turn, path, used)
        if weight is not None:
            message["weight"] = weight
        return message

    def _assistant_text(self, raw: Any, has_calls: bool, path: str) -> str:
        if raw is None and has_calls:
            return ""  # OpenAI's content: null beside tool_calls
        if raw is None:
            self.reading.refuse(BAD_CONTENT, f"{path}: missing value (null) and no tool_calls")
            return ""
        text = self._content(raw, path, json_values=False)
        if text is not None and not text.strip() and not has_calls:
            self.reading.refuse(BAD_CONTENT, f"{path}: empty or whitespace-only text and no tool_calls")
        return text or ""

    def _reasoning(self, turn: dict[str, Any], path: str, used: set[str]) -> str | None:
        key, value = _first_given(turn, REASONING_KEYS)
        if key is None:
            return None
        used.add(key)
        if not isinstance(value, str):
            self.reading.refuse(BAD_FIELD, f"{path}.{key}: expected a string, got {_typed(value)}")
            return None
        return value

    def _weight(self, turn: dict[str, Any], path: str, used: set[str]) -> int | None:
        key, value = _first_given(turn, WEIGHT_KEYS)
        if key is None:
            return None
        used.add(key)
        if isinstance(value, (bool, int, float)) and value in (0, 1):
            return int(value)
        self.reading.refuse(BAD_WEIGHT, f"{path}.{key}: expected 0 or 1, got {_preview(value)}")
        return None

    # --- tool calls

    def _tool_calls(self, raw: Any, path: str) -> list[dict[str, Any]]:
        """OpenAI's tool_calls: [{"id", "type": "function", "function": {"name", "arguments"}}]."""
        if raw is None or raw == []:
            return []
        if not isinstance(raw, list):
            self.reading.refuse(BAD_TOOL_CALL, f"{path}: expected a list of tool calls, got {_typed(raw)}")
            return []
        calls = [self._tool_call(entry, f"{path}[{index}]", alone=len(raw) == 1) for index, entry in enumerate(raw)]
        return [call for call in calls if call is not None]

    def _tool_call(self, entry: Any, path: str, alone: bool) -> dict[str, Any] | None:
        if not isinstance(entry, dict):
            self._wait(None, None, alone)
            self.reading.refuse(BAD_TOOL_CALL, f"{path}: expected an object {{id, type, function}}, got {_typed(entry)}")
            return None
        call_id, function = entry.get("id"), entry.get("function")
        if not isinstance(function, dict):
            self._wait(call_id, None, alone)
            self.reading.refuse(BAD_TOOL_CALL, f"{path}.function: expected an object {{name, arguments}}, got {_typed(function)}")
            return None
        self.reading.count_unused(entry, ("id", "type", "function"), f"{self.column}[].{TOOL_CALLS_KEY}[]")
        self.reading.count_unused(function, ("name", "arguments"), f"{self.column}[].{TOOL_CALLS_KEY}[].function")
        call = self._call(function.get("name"), function.get("arguments"), f"{path}.function", alone, call_id)
        if entry.get("type") not in (None, "function"):
            self.reading.refuse(BAD_TOOL_CALL, f"{path}.type: {_preview(entry['type'])} is not 'function'")
            return None
        if call_id is not None and not (isinstance(call_id, str) and call_id):
            self.reading.refuse(BAD_TOOL_CALL, f"{path}.id: expected a non-empty string, got {_typed(call_id)}")
            return None
        if call is None:
            return None
        return {"id": call_id, **call} if call_id else call

    def _calls_in_text(self, raw: Any, path: str) -> list[dict[str, Any]]:
        """A ShareGPT function_call: its value is the JSON of {"name", "arguments"} or a list of them."""
        entries = raw
        if isinstance(raw, str):
            try:
                entries = json.loads(raw)
            except json.JSONDecodeError as exc:
                self._wait(None, None, alone=True)
                self.reading.refuse(BAD_TOOL_CALL, f"{path}: {_json_error(exc)}")
                return []
        if isinstance(entries, dict):
            located = [(path, entries)]
        elif isinstance(entries, list) and entries:
            located = [(f"{path}[{index}]", entry) for index, entry in enumerate(entries)]
        else:
            self._wait(None, None, alone=True)
            self.reading.refuse(BAD_TOOL_CALL, f"{path}: expected a JSON object {{name, arguments}} or a list of them, got {_preview(raw)}")
            return []
        calls = [self._named_call(entry, where, alone=len(located) == 1) for where, entry in located]
        return [call for call in calls if call is not None]

    def _named_call(self, entry: Any, path: str, alone: bool) -> dict[str, Any] | None:
        if not isinstance(entry, dict):
            self._wait(None, None, alone)
            self.reading.refuse(BAD_TOOL_CALL, f"{path}: expected an object {{name, arguments}}, got {_typed(entry)}")
            return None
        self.reading.count_unused(entry, ("name", "arguments"), f"{self.column}[].{self.turns.content_key}")
        return self._call(entry.get("name"), entry.get("arguments"), path, alone, None)

    def _call(self, name: Any, arguments: Any, path: str, alone: bool, call_id: Any) -> dict[str, Any] | None:
        """The canonical {"type", "function": {"name", "arguments"}} of one call, which now waits
        for its result (even when malformed: its result is then no second error)."""
        self._wait(call_id, name, alone)
        name_ok = self._function_name(name, f"{path}.name")
        parsed = self._arguments(arguments, f"{path}.arguments")
        if not name_ok or parsed is None:
            return None
        return {"type": "function", "function": {"name": name, "arguments": parsed}}

    def _function_name(self, name: Any, path: str) -> bool:
        if isinstance(name, str) and name.strip():
            return True
        reason = "missing function name" if name is None or isinstance(name, str) else f"expected a string, got {_typed(name)}"
        self.reading.refuse(BAD_TOOL_CALL, f"{path}: {reason}")
        return False

    def _arguments(self, raw: Any, path: str) -> dict[str, Any] | None:
        if raw is None:
            self.reading.refuse(BAD_TOOL_CALL, f"{path}: missing (give {{}} for a call without arguments)")
            return None
        value = raw
        if isinstance(raw, str):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                self.reading.refuse(BAD_TOOL_CALL, f"{path}: {_json_error(exc)}")
                return None
        if isinstance(value, dict):
            return value
        self.reading.refuse(BAD_TOOL_CALL, f"{path}: expected a JSON object, got {_typed(value)}")
        return None

    def _wait(self, call_id: Any, name: Any, alone: bool) -> None:
        self.waiting.append(_Call(call_id if isinstance(call_id, str) else None, name if isinstance(name, str) else None, alone))

    # --- tool results

    def _tool_result(self, turn: dict[str, Any], message: dict[str, Any], path: str, used: set[str]) -> None:
        used.update(("tool_call_id", "name"))
        call_id, name = turn.get("tool_call_id"), turn.get("name")
        for key, value in (("tool_call_id", call_id), ("name", name)):
            if value is not None and not isinstance(value, str):
                self.reading.refuse(BAD_FIELD, f"{path}.{key}: expected a string, got {_typed(value)}")
                return
        answered = self._answer(call_id, path)
        if call_id:
            message["tool_call_id"] = call_id
        if not name and answered is not None and (call_id or answered.alone):
            name = answered.name
        if name:
            message["name"] = name

    def _answer(self, call_id: str | None, path: str) -> _Call | None:
        """The waiting call this result answers: the one its id names, or without an id the oldest."""
        for index, call in enumerate(self.waiting):
            if not call_id or call.id == call_id:
                return self.waiting.pop(index)
        if call_id:
            reason = f"{path}.tool_call_id: {call_id!r} matches no earlier unanswered tool call of this row"
        else:
            reason = f"{path}: a tool result without an earlier unanswered tool call in this row"
        self.reading.refuse(TOOL_RESULT_WITHOUT_CALL, reason)
        return None

    # --- the whole row

    def _check_loss(self) -> None:
        assistant = [message for message in self.reading.value if message["role"] == "assistant"]
        if not assistant:
            self.reading.refuse(NO_ASSISTANT_TURN, f"no {self.turns.assistant_name} turn: nothing to learn from")
        elif all(message.get("weight") == 0 for message in assistant):
            self.reading.refuse(NO_LOSS_TURN, "every assistant turn has weight 0: nothing to learn from")


def read_turns(value: Any, turns: TurnFormat, column: str) -> Reading:
    """A conversation cell onto canonical messages (`Reading.value`), with its problems and unused
    fields. Never raises: a malformed cell is a Reading with problems."""
    return _TurnReader(turns, column).read(value)


# --- reading tool definitions ------------------------------------------------------------------


def read_tools(value: Any, column: str = TOOLS_COLUMN) -> Reading:
    """A `tools` cell onto canonical definitions {"type": "function", "function": {"name",
    "description", "parameters"}}; its problems all count under BAD_TOOLS."""
    reading = Reading()
    for index, definition in enumerate(_tool_list(value, column, reading)):
        tool = _tool(definition, f"{column}[{index}]", column, reading)
        if tool is not None:
            reading.value.append(tool)
    return reading


def _tool_list(value: Any, column: str, reading: Reading) -> list[Any]:
    if isinstance(value, str):  # glaive / LLaMA-Factory keep the list as JSON text
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            reading.refuse(BAD_TOOLS, f"{column}: {_json_error(exc)}")
            return []
    if value is None or isinstance(value, list):
        return value or []
    reading.refuse(BAD_TOOLS, f"{column}: expected a list of tool definitions, got {_typed(value)}")
    return []


def _tool(definition: Any, path: str, column: str, reading: Reading) -> dict[str, Any] | None:
    if not isinstance(definition, dict):
        reading.refuse(BAD_TOOLS, f"{path}: expected a tool definition object, got {_typed(definition)}")
        return None
    if definition.get("type") not in (None, "function"):
        reading.refuse(BAD_TOOLS, f"{path}.type: {_preview(definition['type'])} is not 'function'")
        return None
    if "function" not in definition:  # bare: {"name", "description", "parameters"}
        reading.count_unused(definition, ("type", "name", "description", "parameters"), f"{column}[]")
        return _function_definition(definition, path, reading)
    function = definition["function"]
    if not isinstance(function, dict):
        reading.refuse(BAD_TOOLS, f"{path}.function: expected an object {{name, description, parameters}}, got {_typed(function)}")
        return None
    reading.count_unused(definition, ("type", "function"), f"{column}[]")
    reading.count_unused(function, ("name", "description", "parameters"), f"{column}[].function")
    return _function_definition(function, f"{path}.function", reading)


def _function_definition(function: dict[str, Any], path: str, reading: Reading) -> dict[str, Any] | None:
    name, description, parameters = function.get("name"), function.get("description"), function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}  # a function without arguments (see the module docstring)
    if not (isinstance(name, str) and name.strip()):
        reading.refuse(BAD_TOOLS, f"{path}.name: " + ("missing function name" if name is None else f"expected a non-empty string, got {_typed(name)}"))
    elif description is not None and not isinstance(description, str):
        reading.refuse(BAD_TOOLS, f"{path}.description: expected a string, got {_typed(description)}")
    elif not isinstance(parameters, dict):
        reading.refuse(BAD_TOOLS, f"{path}.parameters: expected a JSON object (a JSON schema), got {_typed(parameters)}")
    else:
        described = {"description": description} if description is not None else {}
        return {"type": "function", "function": {"name": name, **described, "parameters": parameters}}
    return None


# --- checks by column --------------------------------------------------------------------------

CellReader = Callable[[Any], Reading]


def cell_readers(record: RecordFormat) -> dict[str, CellReader]:
    """How the cells of a format's structured columns are read: its conversation, its tools."""
    readers: dict[str, CellReader] = {}
    if record.turns is not None:
        turns, column = record.turns, record.turns_column
        readers[column] = lambda value: read_turns(value, turns, column)
    if TOOLS_COLUMN in record.columns:
        readers[TOOLS_COLUMN] = read_tools
    return readers


class _ReadOnce:
    """A cell reader that reads each cell once. pandera runs each check over the whole column, so
    without it a conversation would be read again for every check. It keeps every cell it read
    alive, so an id is never reused while it lives: one schema, one file."""

    def __init__(self, read: CellReader):
        self.read, self.seen = read, {}

    def __call__(self, value: Any) -> Reading:
        seen = self.seen.get(id(value))
        if seen is None or seen[0] is not value:
            seen = self.seen[id(value)] = (value, self.read(value))
        return seen[1]


def _problem_finder(read: CellReader, check: str) -> Finder:
    return lambda value: read(value).problems.get(check)


def column_finders(record: RecordFormat, column: str, readers: dict[str, CellReader] | None = None) -> dict[str, Finder]:
    """The checks of one column, by check name."""
    read = (readers if readers is not None else cell_readers(record)).get(column)
    if read is not None:
        checks = (BAD_TOOLS,) if column == TOOLS_COLUMN else TURN_CHECKS
        return {check: _problem_finder(read, check) for check in checks}
    if column in record.required:
        return {"not_a_string": not_a_string, "empty": empty_text}
    return {"not_a_string": not_optional_text}  # optional text (alpaca input/system) may be empty or missing


# --- length ------------------------------------------------------------------------------------


def _text_length(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def _column_length(column: str, readers: dict[str, CellReader]) -> Callable[[Any], int]:
    """Characters a column's cell adds to the row, counted as the canonical row counts them
    (tool call arguments, tool definitions and reasoning included)."""
    read = readers.get(column)
    if read is None:
        return _text_length
    if column == TOOLS_COLUMN:
        return lambda value: tools_chars(read(value).value)
    return lambda value: sum(message_chars(message) for message in read(value).value)


def row_chars(frame: pd.DataFrame, record: RecordFormat, readers: dict[str, CellReader] | None = None) -> pd.Series:
    """Characters of text in each row (all text columns, or all turns' contents)."""
    readers = readers if readers is not None else cell_readers(record)
    total = pd.Series(0, index=frame.index, dtype="int64")
    for column in record.columns:
        if column in frame.columns:
            total = total + frame[column].map(_column_length(column, readers)).astype("int64")
    return total


# --- the schema --------------------------------------------------------------------------------


def _element_check(name: str, finder: Finder, ignore_na: bool) -> pa.Check:
    return pa.Check(lambda value: finder(value) is None, element_wise=True, name=name, ignore_na=ignore_na)


def record_schema(format_name: str, max_chars: int) -> pa.DataFrameSchema:
    """The pandera schema of one input format. Columns hold raw Python values (dtype object): type
    checks are per row, so a number in row 7 is reported as row 7, not as a column dtype. The
    schema remembers every conversation it read: build one per file."""
    record = FORMATS[format_name]
    readers = {column: _ReadOnce(read) for column, read in cell_readers(record).items()}
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
                for name, finder in column_finders(record, column, readers).items()
            ],
        )
        for column in record.columns
    }
    too_long = pa.Check(lambda frame: row_chars(frame, record, readers) <= max_chars, name=TOO_LONG)
    return pa.DataFrameSchema(columns, checks=[too_long], strict=False, coerce=False)


def explain(format_name: str, column: str | None, check: str, value: Any, max_chars: int) -> str:
    """One line saying why a value failed a check of `record_schema`."""
    if check == NULL:
        return "missing value (null)"
    if check == TOO_LONG:
        return f"row has {value} characters of text, more than max_chars={max_chars}"
    finder = column_finders(FORMATS[format_name], column or "").get(check)
    return (finder(value) if finder else None) or check
