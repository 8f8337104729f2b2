"""Agent data end to end, in one flow run on the tiny model: OpenAI fine-tuning JSONL with tool
calls, weights, a developer turn and content parts (a local file), LLaMA-Factory's glaive ShareGPT
with a JSON-string `tools` column (memory://) and reasoning (a local file); held-out rows that end
in a call. Validated, tokenized with the fallback, trained, scored with tool-call accuracy, and
released with a chat template that renders tools exactly as training did."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from flows.sft import sft
from schemas.config import TemplateOptions
from tasks.core import formatting
from tasks.core.rows import read_dataset
from tests.conftest import production
from tests.test_flow import tiny_config

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CITIES = ["Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo"]


def openai_row(city: str, weight: int = 1) -> dict:
    return {
        "messages": [
            {"role": "developer", "content": "You are a weather bot."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": f"{city}?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp_c": len(city)})},
            {"role": "assistant", "content": f"It is {len(city)} degrees in {city}.", "weight": weight},
        ],
        "tools": [WEATHER],
        "parallel_tool_calls": False,
    }


def glaive_row(city: str) -> dict:
    return {
        "conversations": [
            {"from": "human", "value": f"Find a recipe from {city}"},
            {"from": "function_call", "value": json.dumps({"name": "search_recipes", "arguments": {"city": city}})},
            {"from": "observation", "value": json.dumps({"recipes": [f"{city} soup"]})},
            {"from": "gpt", "value": f"Try {city} soup."},
        ],
        "tools": json.dumps([{"name": "search_recipes", "description": "Search recipes",
                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]),
    }


def reasoning_row(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"{a}+{b}?"},
                         {"role": "assistant", "content": str(a + b), "reasoning_content": f"{a} plus {b}."}]}


def held_out_row(city: str) -> dict:
    """A row whose answer is the call itself: what tool-call accuracy scores."""
    row = openai_row(city)
    row["messages"] = row["messages"][:3]
    return row


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def agent_run(prefect_harness, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agent")
    glaive = "memory://agent-data/glaive.json"
    with fsspec.open(glaive, "w") as handle:
        json.dump([glaive_row(city) for city in CITIES], handle)
    data = [
        write_jsonl(tmp / "openai.jsonl", [openai_row(city) for city in CITIES] + [openai_row("Nowhere", weight=0)]),
        glaive,
        write_jsonl(tmp / "reasoning.jsonl", [reasoning_row(a, a + 1) for a in range(6)]),
    ]
    config = tiny_config(
        tiny_model_dir, Path(data[0]), tmp, eval_data=[write_jsonl(tmp / "held_out.jsonl", [held_out_row(c) for c in ("Bern", "Quito")])],
        template={"max_length": 1024, "reasoning": "inline"},
        eval={"num_generate": 2, "max_new_tokens": 24, "gate": {"max_regression": None}},
    ).model_copy(update={"data": data})
    return config, sft(config)


def test_agent_data_trains_end_to_end(agent_run):
    config, manifest = agent_run
    assert manifest["status"] == "completed"
    tokenized = manifest["stages"]["tokenize-and-cache"]["stats"]
    assert tokenized["rendering"] == {"tools": "fallback", "tool_results": "tool turns", "reasoning": "inline"}
    # 7 OpenAI rows (the one whose answer has weight 0 learns its call), 6 glaive, 6 reasoning.
    assert tokenized["train"]["kept"] == 19 and tokenized["eval"]["kept"] == 2
    validated = manifest["stages"]["validate-data"]["stats"]
    assert validated["rows_dropped"] == 0 and validated["trailing_turns"] == 2  # the result and the weight-0 answer, cut
    assert validated["unused_fields"] == {"column 'parallel_tool_calls'": 9}
    assert validated["turns"]["tool_calls"] == 7 + 6 + 2 and validated["turns"]["reasoning"] == 6


def test_held_out_calls_are_scored(agent_run):
    config, manifest = agent_run
    metrics = json.loads((production(config.output) / "eval" / "metrics.json").read_text())
    for model in ("base", "tuned"):
        assert 0.0 <= metrics[model]["tool_call_accuracy"] <= metrics[model]["tool_name_accuracy"] <= 1.0
        assert metrics[model]["num_tool_call_references"] == 2


def test_released_template_renders_agent_rows_as_training_did(agent_run):
    config, manifest = agent_run
    rows = list(read_dataset(manifest["stages"]["validate-data"]["uri"]))
    base = formatting.load_tokenizer(config.model)
    released = formatting.load_tokenizer(production(config.output))
    template = TemplateOptions.model_validate(config.template.model_dump())
    for row in [r for r in rows if r.get("tools")][:3]:
        trained = formatting.encode_example(row["messages"], base, template, tools=row["tools"])
        text = released.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
        assert released.encode(text, add_special_tokens=False) == trained.input_ids
