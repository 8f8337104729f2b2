"""scoring: packed response-only loss, batched greedy generation, the eval prompt, deltas.

The rows and tokenized examples come from test_evaluate's `build_world` without any training."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tasks.core import formatting, scoring
from tasks.core.collate import IGNORE_INDEX
from tasks.evaluate import eval_samples
from tests.test_evaluate import TEMPLATE, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    return build_world(tmp_path_factory.mktemp("scoring-world"), tiny_model_dir, kinds=())


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from tasks.core.modeling import load_causal_lm

    return load_causal_lm(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(world) -> list[list[int]]:
    return [formatting.render_prompt_ids(s["messages"], world.tokenizer, TEMPLATE) for s in eval_samples(world.data.uri, 4)]


def test_packed_loss_is_token_weighted_over_responses_and_matches_one_example_at_a_time(world, base_model):
    examples = world.splits["train"]
    packed = scoring.response_loss(base_model, examples, batch_size=4)
    single = scoring.response_loss(base_model, examples, batch_size=1)
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


def test_no_loss_bearing_tokens_give_no_loss(base_model):
    example = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}
    assert scoring.response_loss(base_model, [example], batch_size=4) == {
        "eval_loss": None, "perplexity": None, "eval_tokens": 0, "eval_examples": 1,
    }


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(world, base_model, prompts):
    assert len({len(p) for p in prompts}) > 1  # different lengths, so left padding is exercised
    batched = scoring.generate(base_model, world.tokenizer, prompts, max_new_tokens=5, batch_size=4)
    alone = [scoring.generate(base_model, world.tokenizer, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == alone


def test_an_answer_is_the_greedy_continuation_cut_at_the_first_stop_token(world, base_model, prompts):
    tokenizer = world.tokenizer
    stops = scoring.stop_token_ids(base_model, tokenizer)
    assert stops[0] == tokenizer.eos_token_id
    for prompt in prompts:
        output = base_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=stops[0])
        new = output[0, len(prompt):].tolist()
        assert len(new) == 5
        cut = next((i for i, token in enumerate(new) if token in stops), len(new))
        expected = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
        assert scoring.generate(base_model, tokenizer, [prompt], max_new_tokens=5, batch_size=1) == [expected]


def test_an_over_long_eval_prompt_keeps_its_end_and_leaves_room_for_the_answer(world):
    messages = [{"role": "user", "content": "What is the capital of France? " * 20}, {"role": "assistant", "content": "Paris."}]
    template = TEMPLATE.model_copy(update={"max_length": 64})
    full = formatting.render_prompt_ids(messages, world.tokenizer, template)
    cut = scoring.prompt_ids(messages, world.tokenizer, template, max_new_tokens=8)
    assert len(full) > 56 and cut == full[-56:]
    short = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    assert scoring.prompt_ids(short, world.tokenizer, template, 8) == formatting.render_prompt_ids(short, world.tokenizer, template)


def test_the_eval_prompt_shows_the_row_tools_as_training_does(world):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {}}}]
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    template = TEMPLATE.model_copy(update={"max_length": 2048})  # tool definitions take many tiny-vocabulary tokens
    with_tools = scoring.prompt_ids(messages, world.tokenizer, template, 8, tools)
    assert with_tools == formatting.render_prompt_ids(messages, world.tokenizer, template, tools=tools)
    assert "get_weather" in world.tokenizer.decode(with_tools)
    assert scoring.prompt_ids(messages, world.tokenizer, template, 8) == formatting.render_prompt_ids(messages, world.tokenizer, template)


def test_delta_is_tuned_minus_base_over_finite_reported_metrics_only():
    base = {"eval_loss": 2.0, "perplexity": float("inf"), "token_f1": 0.25, "eval_tokens": 10}
    tuned = {"eval_loss": 1.5, "perplexity": 4.5, "token_f1": 0.5, "eval_tokens": 10, "rouge_l": 0.1}
    assert scoring.delta(base, tuned) == {"eval_loss": -0.5, "token_f1": 0.25}
    with_calls = scoring.delta({"tool_call_accuracy": 0.25}, {"tool_call_accuracy": 0.75, "num_tool_call_references": 4})
    assert with_calls == {"tool_call_accuracy": 0.5}
