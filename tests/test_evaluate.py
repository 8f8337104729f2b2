"""evaluate: base vs tuned on the held-out rows, the quality gate, the entry on disk.

Upstream artifacts (validated rows, tokenized store, trained weights) are built here by hand on the
tiny model (`build_world`, also used by the scoring and export tests), so these tests depend on no
other stage. The scores themselves are tested in test_scoring.py, the report in test_reporting.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from schemas.config import EvalOptions, GateOptions, TemplateOptions
from schemas.manifests import DataArtifact, ModelArtifact, TokenizedArtifact, TrainArtifact
from tasks.core import formatting, metrics, scoring
from tasks.core.collate import IGNORE_INDEX, pack_examples
from tasks.evaluate import check_gate, eval_samples, evaluate_models, evaluate_task
from tests.conftest import ALPACA_ROWS

TEMPLATE = TemplateOptions(max_length=128)
OPTIONS = EvalOptions(batch_size=4, num_generate=3, max_new_tokens=6)


def chat(row: dict) -> list[dict]:
    question = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}]


def write_rows(folder: Path) -> DataArtifact:
    """All 8 demo rows for training, the first 4 again as eval rows (a tuned model must improve on
    them), and the fields of a validation report that export reads."""
    rows = [{"messages": chat(r), "split": "train", "source": f"demo.json:{i}"} for i, r in enumerate(ALPACA_ROWS)]
    rows[2:2] = [{"messages": chat(r), "split": "eval", "source": f"demo.json:{i}"} for i, r in enumerate(ALPACA_ROWS[:4])]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = {"files": [{"file": "demo.json", "split": "train", "format": "alpaca", "rows": 8}],
              "split_rule": "content hash < eval_fraction=0.1", "options": {"eval_fraction": 0.1}}
    (folder / "report.json").write_text(json.dumps(report))
    return DataArtifact(stage="validate-data", uri=str(path), key="data-key", report_uri=str(folder / "report.json"))


def tokenize_rows(data: DataArtifact, tokenizer, folder: Path) -> tuple[TokenizedArtifact, dict[str, list[dict]]]:
    from datasets import Dataset, DatasetDict

    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for line in Path(data.uri).read_text().splitlines():
        row = json.loads(line)
        prompt = formatting.render_prompt_ids(row["messages"], tokenizer, TEMPLATE)
        answer = tokenizer.encode(row["messages"][-1]["content"] + "<|im_end|>", add_special_tokens=False)
        ids = prompt + answer
        labels = [IGNORE_INDEX] * len(prompt) + answer
        splits[row["split"]].append({"input_ids": ids, "labels": labels, "length": len(ids)})
    DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(folder / "tokenized"))
    return TokenizedArtifact(stage="tokenize-and-cache", uri=str(folder / "tokenized"), key="tok-key"), splits


def train_steps(model, examples: list[dict], steps: int, lr: float) -> list[dict]:
    """A few packed Adam steps; returns loss-curve records like the train stage's."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = pack_examples(examples)
    model.train()
    curve = []
    for step in range(1, steps + 1):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        curve.append({"step": step, "loss": loss.item(), "lr": lr, "tokens": batch["input_ids"].numel()})
    model.eval()
    return curve


def save_trained(folder: Path, key: str, method: str, model, curve: list[dict]) -> TrainArtifact:
    folder.mkdir(parents=True)
    model.save_pretrained(str(folder / ("adapter" if method == "lora" else "model")))
    (folder / "loss_curve.json").write_text(json.dumps(curve))
    return TrainArtifact(stage="train", uri=str(folder), key=key, method=method, loss_curve_uri=str(folder / "loss_curve.json"))


def build_world(tmp: Path, model_dir: Path, kinds: tuple[str, ...] = ("good", "bad", "lora")) -> SimpleNamespace:
    """Data, tokenized store, base model artifact and the requested trained artifacts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer = formatting.load_tokenizer(model_dir)
    data = write_rows(tmp)
    tokenized, splits = tokenize_rows(data, tokenizer, tmp)
    model = ModelArtifact(stage="import-model", uri=str(model_dir), key="base-key", source=str(model_dir), tokenizer_hash="tok-hash")
    world = SimpleNamespace(tmp=tmp, tokenizer=tokenizer, data=data, tokenized=tokenized, splits=splits, model=model)
    load = lambda: AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)  # noqa: E731
    if "good" in kinds:
        torch.manual_seed(0)
        tuned = load()
        world.good = save_trained(tmp / "good", "good-key", "full", tuned, train_steps(tuned, splits["train"], 8, 1e-2))
    if "bad" in kinds:
        torch.manual_seed(1)
        scrambled = load()
        with torch.no_grad():
            for parameter in scrambled.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.5)
        world.bad = save_trained(tmp / "bad", "bad-key", "full", scrambled, [{"step": 1, "loss": 99.0, "lr": 10.0}])
    if "lora" in kinds:
        torch.manual_seed(2)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        adapted = get_peft_model(load(), config)
        world.lora = save_trained(tmp / "lora", "lora-key", "lora", adapted, train_steps(adapted, splits["train"], 3, 1e-2))
    return world


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    return build_world(tmp_path_factory.mktemp("eval-world"), tiny_model_dir)


def test_eval_samples_are_the_first_eval_rows_in_file_order(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "skip"}, {"role": "assistant", "content": "train row"}], "split": "train"},
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}], "split": "eval"},
        {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}], "split": "eval"},
        {"messages": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "a4"}], "split": "eval"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = eval_samples(str(path), 2)
    assert [(s["prompt"], s["reference"]) for s in samples] == [("q2", "a2"), ("q3", "a3")]
    assert samples[0]["messages"] == rows[1]["messages"]
    assert eval_samples(str(path), 0) == []


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def call(name: str, **arguments) -> dict:
    """A tool call as a canonical assistant turn carries it."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_ROWS = [
    {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Oslo")]}],
     "tools": [WEATHER_TOOL], "split": "train", "source": "tools.jsonl:0"},
    # ends in one call and no text
    {"messages": [{"role": "system", "content": "You help with weather."}, {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", **call("get_weather", city="Paris")}]}],
     "tools": [WEATHER_TOOL], "split": "eval", "source": "tools.jsonl:1"},
    # the last answer reads a tool's result and calls nothing
    {"messages": [{"role": "user", "content": "Weather in Rome?"},
                  {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Rome")]},
                  {"role": "tool", "content": '{"temperature": 24}', "name": "get_weather"},
                  {"role": "assistant", "content": "It is 24 degrees in Rome."}],
     "tools": [WEATHER_TOOL], "split": "eval", "source": "tools.jsonl:2"},
    # text, then two calls; non-ASCII arguments stay readable
    {"messages": [{"role": "user", "content": "Weather in Zürich and Köln?"},
                  {"role": "assistant", "content": "Checking both.",
                   "tool_calls": [call("get_weather", city="Zürich"), call("get_weather", city="Köln")]}],
     "tools": [WEATHER_TOOL], "split": "eval", "source": "tools.jsonl:3"},
    {"messages": chat(ALPACA_ROWS[0]), "split": "eval", "source": "demo.json:0"},
]


def write_tool_rows(folder: Path) -> DataArtifact:
    path = folder / "tool-rows.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in TOOL_ROWS))
    return DataArtifact(stage="validate-data", uri=str(path), key="tool-data-key", report_uri=str(folder / "report.json"))


def test_eval_samples_keep_the_tools_the_expected_calls_and_the_calls_as_trained(tmp_path):
    samples = eval_samples(write_tool_rows(tmp_path).uri, 10)
    paris = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    both = ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln"}}\n</tool_call>')
    assert [(s["prompt"], s["reference"]) for s in samples] == [
        ("Weather in Paris?", paris),
        ('{"temperature": 24}', "It is 24 degrees in Rome."),  # the prompt is the tool's result it answers
        ("Weather in Zürich and Köln?", both),
        ("What is the capital of France?", "The capital of France is Paris."),
    ]
    assert [s["expected_calls"] for s in samples] == [
        [{"name": "get_weather", "arguments": {"city": "Paris"}}],
        [],
        [{"name": "get_weather", "arguments": {"city": "Zürich"}}, {"name": "get_weather", "arguments": {"city": "Köln"}}],
        [],
    ]
    assert [s["tools"] for s in samples] == [[WEATHER_TOOL]] * 3 + [None]
    assert samples[0]["messages"] == TOOL_ROWS[1]["messages"]
    # what the model is scored on is what it is asked to write: the reference's calls parse back
    assert [metrics.parse_tool_calls(s["reference"]) for s in samples] == [s["expected_calls"] for s in samples]


def test_the_reference_is_exactly_what_training_teaches_for_the_last_answer(world, tmp_path):
    """Training renders calls with the fallback template (the tiny template knows no tools); the
    loss-bearing tokens of the last answer are the reference and the end marker, nothing else."""
    template = TEMPLATE.model_copy(update={"max_length": 4096, "train_on": "last_assistant"})
    for row, sample in zip(TOOL_ROWS[1:], eval_samples(write_tool_rows(tmp_path).uri, 10)):
        encoded = formatting.encode_example(row["messages"], world.tokenizer, template, tools=row.get("tools"))
        taught = [token for token, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
        assert world.tokenizer.decode(taught) == sample["reference"] + "<|im_end|>"


def test_answers_to_rows_that_end_in_calls_score_tool_call_accuracy(world, tmp_path, monkeypatch):
    """The prompts carry the rows' tools; the base model answers in prose, the tuned one makes the
    expected calls (generation is replaced, so the test does not depend on what a tiny model learns)."""
    data = write_tool_rows(tmp_path)
    samples = eval_samples(data.uri, 10)
    prompts_seen = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size):
        prompts_seen.append([tokenizer.decode(p) for p in prompts])
        if len(prompts_seen) == 1:  # base
            return ["I cannot check the weather."] * len(prompts)
        return [s["reference"] for s in samples[:-1]] + ['{"name": "get_weather", "arguments": {"city": "Paris"}}']

    monkeypatch.setattr(scoring, "generate", fake_generate)
    options = OPTIONS.model_copy(update={"num_generate": 10, "gate": GateOptions(metric="tool_call_accuracy", max_regression=0.0)})
    template = TEMPLATE.model_copy(update={"max_length": 2048})  # room for the tool definitions in tiny-vocabulary tokens
    result = evaluate_models(data, world.tokenized, world.model, world.good, options, template, str(tmp_path / "cache"))
    assert "get_weather" in prompts_seen[0][0] and "get_weather" not in prompts_seen[0][-1]
    base, tuned = result.stats["base"], result.stats["tuned"]
    assert (base["tool_name_accuracy"], base["tool_call_accuracy"]) == (0.0, 0.0)
    assert (tuned["tool_name_accuracy"], tuned["tool_call_accuracy"]) == (1.0, 1.0)  # over the 2 rows ending in calls
    assert base["num_tool_call_references"] == tuned["num_tool_call_references"] == 2
    assert result.passed and "tool_call_accuracy" in result.gate_message
    folder = Path(result.uri)
    assert json.loads((folder / "metrics.json").read_text())["delta"]["tool_call_accuracy"] == 1.0
    generations = json.loads((folder / "generations.json").read_text())
    assert generations[0]["expected_calls"] == samples[0]["expected_calls"]
    assert (generations[0]["base_calls_right"], generations[0]["tuned_calls_right"]) == (False, True)
    assert set(generations[1]) == set(generations[3]) == {"prompt", "reference", "base", "tuned"}
    report = (folder / "report.md").read_text()
    assert "| tool_call_accuracy | 0.0000 | 1.0000 | 1.0000 |" in report and "| tool_name_accuracy |" in report
    assert "| prompt | reference | base | tuned | calls right (base / tuned) |" in report and "| no / yes |" in report
    assert "2 of them with a reference that ends in tool calls" in report


def test_a_tuned_model_that_improves_passes_and_the_entry_is_complete(world, tmp_path):
    result = evaluate_models(world.data, world.tokenized, world.model, world.good, OPTIONS, TEMPLATE, str(tmp_path / "cache"))
    assert result.stage == "evaluate" and not result.store_hit
    assert result.passed, result.gate_message
    base, tuned = result.stats["base"], result.stats["tuned"]
    assert set(result.stats) == {"base", "tuned", "champion", "comparison"} and result.stats["champion"] is None
    assert tuned["eval_loss"] < base["eval_loss"] and tuned["perplexity"] < base["perplexity"]
    assert base["eval_tokens"] == tuned["eval_tokens"] > 0 and base["num_generated"] == 3
    for name in ("exact_match", "token_f1", "rouge_l", "contains_reference"):
        assert 0.0 <= tuned[name] <= 1.0
    for name in (*metrics.TOOL_METRICS, "num_tool_call_references"):  # no reference ends in a call: absent, not 0
        assert name not in base and name not in tuned
    folder = Path(result.uri)
    assert folder.parent == tmp_path / "cache" / "eval" and folder.name == result.key
    written = json.loads((folder / "metrics.json").read_text())
    assert written["delta"]["eval_loss"] == pytest.approx(tuned["eval_loss"] - base["eval_loss"])
    generations = json.loads((folder / "generations.json").read_text())
    assert [g["reference"] for g in generations] == [r["output"] for r in ALPACA_ROWS[:3]]
    assert set(generations[0]) == {"prompt", "reference", "base", "tuned"}
    assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (folder / "report.md").read_text()
    assert "| eval_loss |" in report and "| prompt | reference | base | tuned |" in report and "loss_curve.png" in report
    assert result.passed

    again = evaluate_task.fn(world.data, world.tokenized, world.model, world.good, OPTIONS, TEMPLATE, str(tmp_path / "cache"))
    assert again.store_hit and again.key == result.key and again.stats == result.stats and again.passed


def test_the_gate_blocks_a_scrambled_model(world, tmp_path):
    result = evaluate_models(world.data, world.tokenized, world.model, world.bad, OPTIONS, TEMPLATE, str(tmp_path / "cache"))
    assert not result.passed
    base, tuned = result.stats["base"]["eval_loss"], result.stats["tuned"]["eval_loss"]
    assert tuned > base
    message = result.gate_message
    assert "eval_loss" in message and f"{base:.4f}" in message and f"{tuned:.4f}" in message and "max_regression 0" in message
    gate = json.loads((Path(result.uri) / "gate.json").read_text())
    assert gate["passed"] is False and gate["metric"] == "eval_loss"


def test_lora_runs_are_evaluated_as_base_plus_adapter_and_gated_on_what_they_score(world, tiny_model_dir, tmp_path):
    """Before: a token_f1 >= 0 gate, which every model passes. Now: the scores are those of base +
    adapter loaded independently, and the same scores pass one gate and fail another."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    options = OPTIONS.model_copy(update={"gate": GateOptions(metric="eval_loss", max_regression=0.0)})
    result = evaluate_models(world.data, world.tokenized, world.model, world.lora, options, TEMPLATE, str(tmp_path / "cache"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), use_safetensors=True)
    adapted = PeftModel.from_pretrained(base, str(Path(world.lora.uri) / "adapter")).eval()
    expected = scoring.response_loss(adapted, world.splits["eval"], batch_size=4)
    tuned = result.stats["tuned"]
    assert tuned["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    answers = [g["tuned"] for g in json.loads((Path(result.uri) / "generations.json").read_text())]
    prompts = [scoring.prompt_ids(s["messages"], world.tokenizer, TEMPLATE, 6) for s in eval_samples(world.data.uri, 3)]
    assert answers == scoring.generate(adapted, world.tokenizer, prompts, 6, 4)
    assert tuned["token_f1"] == pytest.approx(metrics.score_generations(answers, [r["output"] for r in ALPACA_ROWS[:3]])["token_f1"])
    assert tuned["eval_loss"] < result.stats["base"]["eval_loss"] and result.passed, result.gate_message  # it learned
    stricter = GateOptions(metric="eval_loss", max_regression=None, max_value=tuned["eval_loss"] - 1e-3)
    assert check_gate(result.stats["base"], tuned, stricter)[0] is False


def test_disabled_evaluation_passes_without_computing(world, tmp_path):
    options = OPTIONS.model_copy(update={"enabled": False})
    result = evaluate_models(world.data, world.tokenized, world.model, world.bad, options, TEMPLATE, str(tmp_path / "cache"))
    assert result.passed and "disabled" in result.gate_message and result.stats == {"base": {}, "tuned": {}, "champion": None, "comparison": {}}


@pytest.mark.parametrize(
    "gate, base, tuned, passed, words",
    [
        (GateOptions(metric="eval_loss", max_regression=0.0), 2.0, 1.5, True, ["passed", "lower is better"]),
        (GateOptions(metric="eval_loss", max_regression=0.0), 2.0, 2.1, False, ["worse than base by 0.1", "max_regression 0"]),
        (GateOptions(metric="eval_loss", max_regression=0.2), 2.0, 2.1, True, ["passed"]),
        (GateOptions(metric="eval_loss", max_regression=None, max_value=1.0), 2.0, 1.5, False, ["> max_value 1"]),
        (GateOptions(metric="token_f1", max_regression=0.0), 0.5, 0.4, False, ["higher is better", "worse than base by 0.1"]),
        (GateOptions(metric="token_f1", max_regression=0.0), 0.5, 0.5, True, ["passed"]),
        (GateOptions(metric="rouge_l", max_regression=None, min_value=0.6), 0.1, 0.5, False, ["< min_value 0.6"]),
        (GateOptions(metric="exact_match", max_regression=None), 0.0, 0.0, True, ["threshold none"]),
        (GateOptions(metric="contains_reference", max_regression=0.0), 0.0, 0.75, True, ["higher is better", "passed"]),
        (GateOptions(metric="eval_loss", max_regression=0.0), 2.0, None, False, ["unavailable"]),
        (GateOptions(metric="tool_call_accuracy", max_regression=0.0), 0.25, 0.5, True, ["higher is better", "passed"]),
        (GateOptions(metric="tool_name_accuracy", max_regression=None, min_value=0.9), 0.0, 0.8, False, ["< min_value 0.9"]),
        (GateOptions(metric="tool_call_accuracy", max_regression=0.0), None, None, False, ["no generated eval row ends in a tool call"]),
        # Before: a NaN loss was blamed on "no eval rows".
        (GateOptions(metric="eval_loss", max_regression=0.0), 2.0, float("nan"), False, ["is nan, not a number", "diverged"]),
    ],
)
def test_gate_rules(gate, base, tuned, passed, words):
    ok, message = check_gate({gate.metric: base}, {gate.metric: tuned}, gate)
    assert ok is passed
    assert gate.metric in message
    for word in words:
        assert word in message


def test_the_tuned_held_out_loss_measured_in_training_is_reused_not_recomputed():
    from schemas.manifests import TrainArtifact
    from tasks.evaluate import loss_from_training

    trained = TrainArtifact(stage="train", uri="/t", key="k", method="lora", loss_curve_uri="/t/loss_curve.json",
                            stats={"exported_step": 4})
    curve = [{"step": 2, "loss": 3.0, "eval_loss": 2.5}, {"step": 4, "loss": 2.0, "eval_loss": 2.25}, {"step": 6, "loss": 1.0, "eval_loss": 2.4}]
    examples = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": [5, 6], "labels": [5, 6]}]
    reused = loss_from_training(trained, curve, examples)
    assert reused["eval_loss"] == 2.25 and reused["eval_loss_source"] == "training, step 4"
    assert reused["eval_tokens"] == 3 and reused["eval_examples"] == 2
    assert loss_from_training(trained, [{"step": 4, "loss": 2.0}], examples) is None  # not measured in training
