"""validate-data on the chat data people have today: OpenAI tool-call fine-tuning JSONL, LLaMA-Factory
(glaive) ShareGPT with tools, reasoning, per-turn weights. Each format is checked against the exact
canonical rows (issue 12), each bad row by the exact path of its problem, and the report counts what
the canonical rows do not carry."""

from __future__ import annotations

import json

import pytest

from schemas.config import DataOptions
from tasks.core import storage
from tasks.validate import DataValidationError, report_table, validate_data
from tests.conftest import ALPACA_ROWS
from tests.test_readers import CHAT_ROW, encode, mem, put  # noqa: F401 - mem is a fixture
from tests.test_validate import cache, run  # noqa: F401 - cache is a fixture

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER_PARAMETERS}}
NO_PARAMETERS = {"type": "object", "properties": {}}


def weather_call(city: str, call_id: str | None = None) -> dict:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    return {"id": call_id, **call} if call_id else call


# --- OpenAI chat fine-tuning JSONL -------------------------------------------------------------

OPENAI_ROW = {
    "messages": [
        {"role": "developer", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 18}"},
        {"role": "assistant", "content": "It is 18 °C in Paris.", "weight": 1},
    ],
    "tools": [WEATHER_TOOL],
    "parallel_tool_calls": False,
}
OPENAI_CANONICAL = {
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [weather_call("Paris", "call_1")]},
        {"role": "tool", "content": "{\"temp_c\": 18}", "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "assistant", "content": "It is 18 °C in Paris.", "weight": 1},
    ],
    "tools": [WEATHER_TOOL],
}
# Parallel calls (object and string arguments) answered out of order, content as text parts in both
# spellings, a tool result given as data, weights as 0 / 1.0 / true, a bare tool without parameters.
PARALLEL_ROW = {
    "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "value": "Weather in Paris and Oslo?"}]},
        {"role": "assistant", "content": "Let me check.", "weight": 0},
        {"role": "assistant", "content": "", "loss_weight": 1.0, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
        ]},
        {"role": "tool", "tool_call_id": "b", "content": {"temp_c": 4}},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "{\"temp_c\": 18}"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Paris 18 °C, "}, {"type": "text", "text": "Oslo 4 °C."}], "weight": True},
    ],
    "tools": [WEATHER_TOOL, {"name": "get_time", "description": "Current time"}],
}
PARALLEL_CANONICAL = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Let me check.", "weight": 0},
        {"role": "assistant", "content": "", "tool_calls": [weather_call("Paris", "a"), weather_call("Oslo", "b")], "weight": 1},
        {"role": "tool", "content": "{\"temp_c\": 4}", "tool_call_id": "b", "name": "get_weather"},
        {"role": "tool", "content": "{\"temp_c\": 18}", "tool_call_id": "a", "name": "get_weather"},
        {"role": "assistant", "content": "Paris 18 °C, Oslo 4 °C.", "weight": 1},
    ],
    "tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": NO_PARAMETERS}}],
}

# --- LLaMA-Factory ShareGPT (glaive tool-call demo) --------------------------------------------

RECIPE_TOOLS = [{
    "name": "search_recipes", "description": "Search recipes",
    "parameters": {"type": "object", "properties": {"ingredients": {"type": "array", "items": {"type": "string"}}}, "required": ["ingredients"]},
}]
GLAIVE_ROW = {
    "conversations": [
        {"from": "human", "value": "Find a recipe with chicken"},
        {"from": "function_call", "value": "{\"name\": \"search_recipes\", \"arguments\": {\"ingredients\": [\"chicken\"]}}"},
        {"from": "observation", "value": "{\"recipes\": [\"Chicken soup\"]}"},
        {"from": "gpt", "value": "Try chicken soup."},
    ],
    "tools": json.dumps(RECIPE_TOOLS),
}
GLAIVE_CANONICAL = {
    "messages": [
        {"role": "user", "content": "Find a recipe with chicken"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "search_recipes", "arguments": {"ingredients": ["chicken"]}}},
        ]},
        {"role": "tool", "content": "{\"recipes\": [\"Chicken soup\"]}", "name": "search_recipes"},
        {"role": "assistant", "content": "Try chicken soup."},
    ],
    "tools": [{"type": "function", "function": RECIPE_TOOLS[0]}],
}
# Parallel calls in one function_call turn and one observation for both (LLaMA-Factory's layout):
# which call that result answers is not known for sure, so it gets no name. The system column
# comes first.
GLAIVE_PARALLEL_ROW = {
    "system": "You are a weather bot.",
    "conversations": [
        {"from": "human", "value": "Weather in Paris and Oslo?"},
        {"from": "function_call", "value": json.dumps([
            {"name": "get_weather", "arguments": {"city": "Paris"}},
            {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})},
        ])},
        {"from": "observation", "value": "[{\"temp_c\": 18}, {\"temp_c\": 4}]"},
        {"from": "gpt", "value": "18 °C and 4 °C."},
    ],
    "tools": json.dumps([WEATHER_TOOL["function"]]),
}
GLAIVE_PARALLEL_CANONICAL = {
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [weather_call("Paris"), weather_call("Oslo")]},
        {"role": "tool", "content": "[{\"temp_c\": 18}, {\"temp_c\": 4}]"},
        {"role": "assistant", "content": "18 °C and 4 °C."},
    ],
    "tools": [WEATHER_TOOL],
}

# --- reasoning ---------------------------------------------------------------------------------

REASONING_ROW = {
    "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning": "Three and three."},
        {"role": "user", "content": "4+4?"},
        {"role": "assistant", "content": "8", "thinking": "Four and four.", "loss_weight": False},
        {"role": "user", "content": "5+5?"},
        {"role": "assistant", "content": "10", "reasoning_content": ""},
    ]
}
REASONING_CANONICAL = {
    "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning": "Two and two."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning": "Three and three."},
        {"role": "user", "content": "4+4?"},
        {"role": "assistant", "content": "8", "reasoning": "Four and four.", "weight": 0},
        {"role": "user", "content": "5+5?"},
        {"role": "assistant", "content": "10"},  # an empty reasoning is none
    ]
}


@pytest.fixture(params=["file", "memory"])
def place(request, tmp_path, mem):
    """Writes rows as JSONL to a local file or a memory:// URL and returns its URL."""

    def write(name: str, rows: list) -> str:
        if request.param == "memory":
            return put(f"{mem}/{name}", rows, "jsonl")
        path = tmp_path / name
        path.write_bytes(encode(rows, "jsonl"))
        return str(path)

    return write


def canonical(url: str, *expected: dict) -> list[dict]:
    return [{**row, "split": "train", "source": f"{url}:{index}"} for index, row in enumerate(expected)]


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([OPENAI_ROW, PARALLEL_ROW], [OPENAI_CANONICAL, PARALLEL_CANONICAL]),
        ([GLAIVE_ROW, GLAIVE_PARALLEL_ROW], [GLAIVE_CANONICAL, GLAIVE_PARALLEL_CANONICAL]),
        ([REASONING_ROW], [REASONING_CANONICAL]),
    ],
    ids=["openai", "glaive-sharegpt", "reasoning"],
)
def test_each_format_maps_onto_the_exact_canonical_rows(place, cache, rows, expected):
    url = place("data.jsonl", rows)
    artifact, out = run([url], cache, eval_fraction=0.0)
    assert out == canonical(url, *expected)
    if "tools" not in expected[0]:  # a row without tools is written without the key
        assert '"tools"' not in storage.read_text(artifact.uri)


def test_column_mapping_renames_the_conversation_and_tools_columns(mem, cache):
    row = {"dialog": OPENAI_ROW["messages"], "functions": json.dumps(OPENAI_ROW["tools"])}
    url = put(f"{mem}/mapped.jsonl", [row], "jsonl")
    _, out = run([url], cache, column_mapping={"dialog": "messages", "functions": "tools"})
    assert out == canonical(url, OPENAI_CANONICAL)


def test_rows_without_tools_keep_the_content_key_they_had_before_tools(mem, cache):
    """Keys later stages cache on (and the hash split) must not move for data that has no tools;
    turn keys the canonical row never carried (name on a user turn, refusal: null) change nothing.
    (The key is a hash of the rows' digests and splits since datasets are sharded, issue 15.)"""
    extra = {"messages": [{"role": "user", "content": "Hi", "name": "bob"}, {"role": "assistant", "content": "Yo", "refusal": None}], "id": 7}
    share = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    urls = [put(f"{mem}/a.jsonl", ALPACA_ROWS, "jsonl"), put(f"{mem}/c.jsonl", [CHAT_ROW, extra], "jsonl"), put(f"{mem}/s.jsonl", [share], "jsonl")]
    artifact, _ = run(urls, cache)
    assert artifact.key == "5180cc81d7efa42d4f9f88790e92d6215503cceaa6e1f4d9538193b44b101c1f"  # computed before tools existed


# --- bad rows ----------------------------------------------------------------------------------

USER = {"role": "user", "content": "Weather?"}
ANSWER = {"role": "assistant", "content": "Sunny."}


def calling(arguments, name="get_weather", call_id="c1") -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}


def result(call_id=None) -> dict:
    return {"role": "tool", "content": "18", **({"tool_call_id": call_id} if call_id else {})}


# (row, column, check, reason): one bad row each (the last has two problems, both reported).
BAD_CHAT_ROWS = [
    ({"messages": [USER, calling("{\"city\": \"Paris\" \"x\"}"), ANSWER]}, "messages", "bad_tool_call",
     "messages[1].tool_calls[0].function.arguments: not valid JSON (Expecting ',' delimiter at char 17)"),
    ({"messages": [USER, calling("[\"Paris\"]"), ANSWER]}, "messages", "bad_tool_call",
     "messages[1].tool_calls[0].function.arguments: expected a JSON object, got list ['Paris']"),
    ({"messages": [USER, calling("{}", name=None), ANSWER]}, "messages", "bad_tool_call",
     "messages[1].tool_calls[0].function.name: missing function name"),
    ({"messages": [USER, calling("{}"), result("c9"), ANSWER]}, "messages", "tool_result_without_call",
     "messages[2].tool_call_id: 'c9' matches no earlier unanswered tool call of this row"),
    ({"messages": [USER, result(), ANSWER]}, "messages", "tool_result_without_call",
     "messages[1]: a tool result without an earlier unanswered tool call in this row"),
    ({"messages": [USER, calling("{}"), result(), result(), ANSWER]}, "messages", "tool_result_without_call",
     "messages[3]: a tool result without an earlier unanswered tool call in this row"),
    ({"messages": [USER, {"role": "assistant", "content": " "}]}, "messages", "bad_content",
     "messages[1].content: empty or whitespace-only text and no tool_calls"),
    ({"messages": [{"role": "user", "content": None}, ANSWER]}, "messages", "bad_content",
     "messages[0].content: missing value (null)"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]}, ANSWER]},
     "messages", "bad_content", "messages[0].content[1]: 'image_url' part: only text parts are supported"),
    ({"messages": [USER, {**ANSWER, "weight": 0.5}]}, "messages", "bad_weight", "messages[1].weight: expected 0 or 1, got 0.5"),
    ({"messages": [USER, {**ANSWER, "weight": 0}, USER, {**ANSWER, "loss_weight": False}]}, "messages", "no_loss_turn",
     "every assistant turn has weight 0: nothing to learn from"),
    ({"messages": [{"role": "function", "content": "x"}, ANSWER]}, "messages", "bad_role",
     "messages[0].role: 'function' is not one of system/developer/user/assistant/tool"),
    ({"messages": [USER, {**ANSWER, "reasoning_content": ["step"]}]}, "messages", "bad_field",
     "messages[1].reasoning_content: expected a string, got list ['step']"),
    ({"messages": [USER, ANSWER], "tools": [{"type": "function", "function": {"parameters": NO_PARAMETERS}}]}, "tools", "bad_tools",
     "tools[0].function.name: missing function name"),
    ({"messages": [USER, ANSWER], "tools": [{"name": "get_time", "parameters": "{}"}]}, "tools", "bad_tools",
     "tools[0].parameters: expected a JSON object (a JSON schema), got str '{}'"),
    ({"messages": [USER, ANSWER], "tools": "[{\"name\": \"get_time\""}, "tools", "bad_tools",
     "tools: not valid JSON (Expecting ',' delimiter at char 20)"),
]
TWO_PROBLEMS = {"messages": [USER, calling("{"), result("nope"), ANSWER]}
TWO_PROBLEMS_REASONS = [
    ("bad_tool_call", "messages[1].tool_calls[0].function.arguments: not valid JSON (Expecting property name enclosed in double quotes at char 1)"),
    ("tool_result_without_call", "messages[2].tool_call_id: 'nope' matches no earlier unanswered tool call of this row"),
]
BAD_SHAREGPT_ROWS = [
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "{'name': 'f'}"}, {"from": "gpt", "value": "A"}]},
     "conversations", "bad_tool_call", "conversations[1].value: not valid JSON (Expecting property name enclosed in double quotes at char 1)"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "observation", "value": "18"}, {"from": "gpt", "value": "A"}]},
     "conversations", "tool_result_without_call", "conversations[1]: a tool result without an earlier unanswered tool call in this row"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "[{\"name\": \"f\", \"arguments\": {}}, {\"arguments\": {}}]"},
                        {"from": "gpt", "value": "A"}]},
     "conversations", "bad_tool_call", "conversations[1].value[1].name: missing function name"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "?"}, {"from": "gpt", "value": "A"}]}, "conversations", "bad_role",
     "conversations[1].from: 'bot' is not one of system/human/gpt/function_call/observation"),
]


def bad_files(mem) -> tuple[str, str]:
    chat = put(f"{mem}/chat.jsonl", [OPENAI_ROW] + [row for row, *_ in BAD_CHAT_ROWS] + [TWO_PROBLEMS], "jsonl")
    sharegpt = put(f"{mem}/sharegpt.jsonl", [GLAIVE_ROW] + [row for row, *_ in BAD_SHAREGPT_ROWS], "jsonl")
    return chat, sharegpt


def expected_failures(chat: str, sharegpt: str) -> list[tuple]:
    chat_rows = [(chat, row, column, check, reason) for row, (_, column, check, reason) in enumerate(BAD_CHAT_ROWS, start=1)]
    two = len(BAD_CHAT_ROWS) + 1
    chat_rows += [(chat, two, "messages", check, reason) for check, reason in TWO_PROBLEMS_REASONS]
    return chat_rows + [(sharegpt, row, column, check, reason) for row, (_, column, check, reason) in enumerate(BAD_SHAREGPT_ROWS, start=1)]


def test_every_problem_of_every_file_is_named_by_its_path_at_once(mem, cache):
    chat, sharegpt = bad_files(mem)
    with pytest.raises(DataValidationError) as raised:
        validate_data([chat, sharegpt], [], DataOptions(), cache)
    message = str(raised.value)
    failures = expected_failures(chat, sharegpt)
    assert message.startswith(f"{len(BAD_CHAT_ROWS) + 1 + len(BAD_SHAREGPT_ROWS)} invalid row(s), {len(failures)} failure(s)")
    report = storage.read_json(message.splitlines()[0].rsplit("full list: ", 1)[1])
    assert [(f["file"], f["row"], f["column"], f["check"], f["reason"]) for f in report["invalid_rows"]] == failures
    first = failures[0]
    assert f"  {chat} row 1 (0-based), line 2, column 'messages': {first[4]}" in message.splitlines()


def test_dropped_tool_rows_are_counted_by_their_first_problem(mem, cache):
    chat, sharegpt = bad_files(mem)
    artifact, out = run([chat, sharegpt], cache, on_invalid="drop", eval_fraction=0.0)
    assert out == canonical(chat, OPENAI_CANONICAL) + canonical(sharegpt, GLAIVE_CANONICAL)
    assert artifact.stats["dropped_by_reason"] == {
        "bad_tool_call": 6, "tool_result_without_call": 4, "bad_content": 3, "bad_weight": 1, "no_loss_turn": 1, "bad_role": 2,
        "bad_field": 1, "bad_tools": 3,
    }


def test_max_chars_counts_calls_tool_definitions_and_reasoning(mem, cache):
    text = len("You are a weather bot.") + len("Weather in Paris?") + len("{\"temp_c\": 18}") + len("It is 18 °C in Paris.")
    call = len("get_weather") + len(json.dumps({"city": "Paris"}))
    tools = len(json.dumps([WEATHER_TOOL], ensure_ascii=False))
    url = put(f"{mem}/long.jsonl", [OPENAI_ROW], "jsonl")
    with pytest.raises(DataValidationError) as raised:
        validate_data([url], [], DataOptions(max_chars=text + call + tools - 1), cache)
    assert f"column 'messages+tools': row has {text + call + tools} characters of text, more than max_chars=" in str(raised.value)
    reasoning = sum(len(turn.get("reasoning", "")) + len(turn["content"]) for turn in REASONING_CANONICAL["messages"])
    with pytest.raises(DataValidationError, match=f"row has {reasoning} characters"):
        validate_data([put(f"{mem}/r.jsonl", [REASONING_ROW], "jsonl")], [], DataOptions(max_chars=reasoning - 1), cache)


# --- the report --------------------------------------------------------------------------------


def test_the_report_counts_turns_trailing_turns_and_every_unused_field(mem, cache):
    openai = {
        "messages": [
            {"role": "system", "content": "S", "name": "ops"},
            {"role": "user", "content": [{"type": "text", "text": "Q", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": "A", "refusal": None, "audio": None},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "index": 0, "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            {"role": "user", "content": "Thanks!", "weight": 1},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": NO_PARAMETERS, "strict": True}}],
        "metadata": {"origin": "support"},
        "parallel_tool_calls": False,
    }
    reasoning = {
        "messages": [
            {"role": "developer", "content": "D"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A", "reasoning_content": "R", "thinking": "T", "weight": 0},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
        ],
        "metadata": None,
    }
    history = {"instruction": "And now?", "output": "Now this.", "history": [["Before?", "That."]]}  # LLaMA-Factory alpaca
    urls = [put(f"{mem}/chat.jsonl", [openai, reasoning], "jsonl"), put(f"{mem}/alpaca.jsonl", [history], "jsonl")]
    artifact, _ = run(urls, cache)
    unused = {
        "column 'history'": 1, "column 'metadata'": 1, "column 'parallel_tool_calls'": 1,
        "messages[].content[].cache_control": 1, "messages[].name": 1, "messages[].thinking": 1, "messages[].tool_calls[].index": 1,
        "messages[].weight": 1, "tools[].function.strict": 1,
    }
    turns = {"system": 2, "user": 5, "assistant": 5, "tool": 1, "tool_calls": 1, "reasoning": 1, "weight_0": 1}
    report = storage.read_json(artifact.report_uri)
    assert (report["unused_fields"], report["turns"], report["trailing_turns"]) == (unused, turns, 2)
    assert {name: artifact.stats[name] for name in ("unused_fields", "turns", "trailing_turns")} == {
        "unused_fields": unused, "turns": turns, "trailing_turns": 2,
    }
    table = report_table(artifact.stats)
    assert {"measure": "unused_fields.column 'metadata'", "value": 1} in table
    assert {"measure": "turns.tool_calls", "value": 1} in table


def test_a_system_turn_in_the_conversation_wins_over_the_system_column(mem, cache):
    row = {"system": "Column.", "conversations": [{"from": "system", "value": "Turn."}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    artifact, out = run([put(f"{mem}/s.jsonl", [row], "jsonl")], cache)
    assert out[0]["messages"][0] == {"role": "system", "content": "Turn."}
    assert artifact.stats["unused_fields"] == {"column 'system'": 1}
