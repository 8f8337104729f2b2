"""evaluate: packed response-only loss, batched greedy generation, the quality gate, the entry on disk.

Upstream artifacts (validated rows, tokenized store, trained weights) are built here by hand on the
tiny model, so these tests depend on no other stage."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from schemas.config import EvalOptions, GateOptions, TemplateOptions
from schemas.manifests import DataArtifact, ModelArtifact, TokenizedArtifact, TrainArtifact
from tasks.core import formatting
from tasks.core.collate import IGNORE_INDEX, pack_examples
from tasks.evaluate import (
    QualityGateError,
    check_gate,
    enforce_gate,
    eval_samples,
    evaluate_models,
    evaluate_task,
    generate,
    metric_rows,
    response_loss,
)
from tests.conftest import ALPACA_ROWS

TEMPLATE = TemplateOptions(max_length=128)
OPTIONS = EvalOptions(batch_size=4, num_generate=3, max_new_tokens=6)


def chat(row: dict) -> list[dict]:
    question = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}]


def write_rows(folder: Path) -> DataArtifact:
    """All 8 demo rows for training, the first 4 again as eval rows (a tuned model must improve on them)."""
    rows = [{"messages": chat(r), "split": "train", "source": f"demo.json:{i}"} for i, r in enumerate(ALPACA_ROWS)]
    rows[2:2] = [{"messages": chat(r), "split": "eval", "source": f"demo.json:{i}"} for i, r in enumerate(ALPACA_ROWS[:4])]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
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


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from tasks.core.modeling import load_causal_lm

    return load_causal_lm(tiny_model_dir)


def test_packed_loss_is_token_weighted_over_responses_and_matches_one_example_at_a_time(world, base_model):
    examples = world.splits["train"]
    packed = response_loss(base_model, examples, batch_size=4)
    single = response_loss(base_model, examples, batch_size=1)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:
            labels = torch.tensor([example["labels"]])
            count = int((labels[:, 1:] != IGNORE_INDEX).sum())
            nll += base_model(input_ids=torch.tensor([example["input_ids"]]), labels=labels).loss.item() * count
            tokens += count
    assert packed["eval_tokens"] == single["eval_tokens"] == tokens
    assert packed["eval_examples"] == len(examples)
    assert packed["eval_loss"] == pytest.approx(nll / tokens, abs=1e-4)
    assert single["eval_loss"] == pytest.approx(nll / tokens, abs=1e-4)
    assert packed["perplexity"] == pytest.approx(math.exp(packed["eval_loss"]))


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(world, base_model):
    prompts = [formatting.render_prompt_ids(s["messages"], world.tokenizer, TEMPLATE) for s in eval_samples(world.data.uri, 4)]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so left padding is exercised
    batched = generate(base_model, world.tokenizer, prompts, max_new_tokens=5, batch_size=4)
    alone = [generate(base_model, world.tokenizer, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == alone


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


def test_a_tuned_model_that_improves_passes_and_the_entry_is_complete(world, tmp_path):
    result = evaluate_models(world.data, world.tokenized, world.model, world.good, OPTIONS, TEMPLATE, str(tmp_path / "cache"))
    assert result.stage == "evaluate" and not result.store_hit
    assert result.passed, result.gate_message
    base, tuned = result.stats["base"], result.stats["tuned"]
    assert set(result.stats) == {"base", "tuned"}
    assert tuned["eval_loss"] < base["eval_loss"] and tuned["perplexity"] < base["perplexity"]
    assert base["eval_tokens"] == tuned["eval_tokens"] > 0 and base["num_generated"] == 3
    for name in ("exact_match", "token_f1", "rouge_l", "contains_reference"):
        assert 0.0 <= tuned[name] <= 1.0
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
    rows = metric_rows(base, tuned)
    assert rows[0]["metric"] == "eval_loss" and rows[0]["delta"] < 0
    enforce_gate(result)  # passes silently

    again = evaluate_task.fn(world.data, world.tokenized, world.model, world.good, OPTIONS, TEMPLATE, str(tmp_path / "cache"))
    assert again.store_hit and again.key == result.key and again.stats == result.stats and again.passed


def test_the_gate_blocks_a_scrambled_model(world, tmp_path):
    result = evaluate_models(world.data, world.tokenized, world.model, world.bad, OPTIONS, TEMPLATE, str(tmp_path / "cache"))
    assert not result.passed
    base, tuned = result.stats["base"]["eval_loss"], result.stats["tuned"]["eval_loss"]
    assert tuned > base
    with pytest.raises(QualityGateError) as raised:
        enforce_gate(result)
    message = str(raised.value)
    assert "eval_loss" in message and f"{base:.4f}" in message and f"{tuned:.4f}" in message and "max_regression 0" in message
    gate = json.loads((Path(result.uri) / "gate.json").read_text())
    assert gate["passed"] is False and gate["metric"] == "eval_loss"


def test_lora_runs_are_evaluated_as_base_plus_adapter(world, tmp_path):
    options = OPTIONS.model_copy(update={"gate": GateOptions(metric="token_f1", max_regression=None, min_value=0.0)})
    result = evaluate_models(world.data, world.tokenized, world.model, world.lora, options, TEMPLATE, str(tmp_path / "cache"))
    assert result.passed and "token_f1" in result.gate_message
    assert result.stats["tuned"]["eval_loss"] != result.stats["base"]["eval_loss"]


def test_disabled_evaluation_passes_without_computing(world, tmp_path):
    options = OPTIONS.model_copy(update={"enabled": False})
    result = evaluate_models(world.data, world.tokenized, world.model, world.bad, options, TEMPLATE, str(tmp_path / "cache"))
    assert result.passed and "disabled" in result.gate_message and result.stats == {"base": {}, "tuned": {}}


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
