"""The canonical row: content identity, duplicates, the hash split, and its JSONL file."""

from __future__ import annotations

import json

import numpy as np

from tasks.core.rows import (
    DIGEST_BYTES,
    Row,
    digest_fractions,
    hash_split,
    read_canonical,
    write_canonical,
)


def chat(question: str, answer: str = "A.") -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def row(question: str, split: str = "train", source: str = "f.jsonl:0") -> Row:
    return Row(chat(question), split, source)


def test_identity_is_the_messages_alone():
    one = Row([{"content": "Q?", "role": "user"}], "train", "a.jsonl:0")
    other = Row([{"role": "user", "content": "Q?"}], "eval", "b.jsonl:7")
    assert one.canonical == other.canonical and one.fraction == other.fraction
    assert 0 <= one.fraction < 1 and one.fraction != row("R?").fraction
    assert row("Q?", source="x").chars == len("Q?") + len("A.")


def test_the_digest_carries_the_fraction_and_tells_rows_apart():
    rows = [row(f"question {index}") for index in range(50)]
    digests = np.array([r.digest for r in rows], dtype=f"S{DIGEST_BYTES}")
    assert digest_fractions(digests).tolist() == [r.fraction for r in rows]
    assert len(set(digests.tolist())) == 50 and row("question 3", "eval", "x:9").digest == rows[3].digest


def test_hash_split_keeps_one_row_on_each_side():
    assert hash_split([0.9, 0.8, 0.7], 0.1) == [False, False, True]
    assert hash_split([0.01, 0.02], 0.5) == [True, False]
    assert hash_split([0.3, 0.3], 0.1) == [False, True]
    assert hash_split([0.01], 0.5) == [False]
    assert hash_split([0.01, 0.9], 0.0) == [False, False]


def test_hash_split_is_deterministic_and_keeps_repeats_together():
    rows = [row(f"question {index}") for index in range(200)] + [row(f"question {index}") for index in range(10)]
    held = hash_split([r.fraction for r in rows], 0.2)
    assert held == hash_split([r.fraction for r in rows], 0.2)
    held_out = {r.canonical for r, out in zip(rows, held) if out}
    assert not held_out & {r.canonical for r, out in zip(rows, held) if not out}
    assert 20 < len(held_out) < 60


def test_written_rows_read_back_in_order(tmp_path):
    rows = [Row(chat("Ça va ?", "Oui."), "train", "f.jsonl:0"), row("b", "eval", "f.jsonl:1")]
    path = tmp_path / "data.jsonl"
    write_canonical(path, rows)
    assert "Ça va" in path.read_text(encoding="utf-8")  # text stays readable, not \u-escaped
    assert list(read_canonical(str(path))) == [
        {"messages": r.messages, "split": r.split, "source": r.source} for r in rows
    ]


def test_reader_skips_blank_lines_and_stops_where_its_caller_does(tmp_path):
    path = tmp_path / "data.jsonl"
    first = {"messages": chat("a"), "split": "eval", "source": "f:0"}
    path.write_text("\n" + json.dumps(first) + "\n\nnot json: never read\n", encoding="utf-8")
    assert next(read_canonical(f"file://{path}")) == first


# --- rows with tools ---------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALLING = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning": "Ask the tool.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
    ]},
    {"role": "tool", "content": "18", "tool_call_id": "c1", "name": "get_weather"},
    {"role": "assistant", "content": "18 °C.", "weight": 1},
]


def test_a_row_without_tools_is_hashed_and_written_exactly_as_before_tools_existed():
    plain = row("Q?")
    assert plain.canonical == '[{"content":"Q?","role":"user"},{"content":"A.","role":"assistant"}]'
    assert plain.as_json() == '{"messages":[{"role":"user","content":"Q?"},{"role":"assistant","content":"A."}],"split":"train","source":"f.jsonl:0"}'
    assert Row(chat("Q?"), "train", "f.jsonl:0", tools=[]).canonical == plain.canonical


def test_tools_are_part_of_the_content_and_written_only_when_given(tmp_path):
    with_tools, without = Row(CALLING, "train", "f:0", [WEATHER]), Row(CALLING, "train", "f:1")
    assert with_tools.canonical == json.dumps({"messages": CALLING, "tools": [WEATHER]}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert with_tools.digest != without.digest
    assert list(json.loads(with_tools.as_json())) == ["messages", "tools", "split", "source"]
    path = tmp_path / "data.jsonl"
    write_canonical(path, [with_tools, without])
    assert list(read_canonical(str(path))) == [
        {"messages": CALLING, "tools": [WEATHER], "split": "train", "source": "f:0"},
        {"messages": CALLING, "split": "train", "source": "f:1"},
    ]


def test_chars_count_every_text_that_is_tokenized():
    """Content, reasoning, each call's name and JSON arguments, and the tool definitions as JSON."""
    text = len("Weather in Paris?") + len("Ask the tool.") + len("get_weather") + len('{"city": "Paris"}') + len("18") + len("18 °C.")
    assert Row(CALLING, "train", "f:0").chars == text
    assert Row(CALLING, "train", "f:0", [WEATHER]).chars == text + len(json.dumps([WEATHER]))
