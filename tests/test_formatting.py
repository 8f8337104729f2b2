"""Token-exact masks: every expected list is assembled by hand from the tiny tokenizer's pieces."""

from __future__ import annotations

import pytest

from schemas.config import TemplateOptions
from tasks.core.collate import IGNORE_INDEX
from tasks.core.formatting import (
    Dropped,
    EncodedExample,
    TemplateError,
    encode_batch,
    encode_example,
    load_tokenizer,
    render_prompt_ids,
)
from tests.tiny import CHATML_TEMPLATE, build_tokenizer

Q1, A1 = "What is the capital of France?", "The capital of France is Paris."
Q2, A2 = "Translate hello to French.", "Bonjour."
Q3, A3 = "Who are you?", "I am Fennec, an assistant made by Northwind Labs."
TINY_SYSTEM = "You are a tiny test assistant."

# A template without {% generation %} markers whose answers end in eos_token (TRL refuses these
# for assistant-only loss).
USER_ASSISTANT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ m['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# ChatML with generation markers: they are ignored, the masks come out the same.
CHATML_GENERATION_TEMPLATE = CHATML_TEMPLATE.replace(
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}",
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}",
)
# Renders the last message differently from the same message inside a longer chat.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}{% if loop.last %}{{ '[last] ' }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def chat(*pairs: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for i, text in enumerate(pairs):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return messages


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("formatting-tokenizers")
    build_tokenizer(root / "chatml")
    build_tokenizer(root / "chatml-bos", add_bos=True)
    build_tokenizer(root / "base", chat_template=None, add_bos=True)
    found = {name: load_tokenizer(root / name) for name in ("chatml", "chatml-bos", "base")}
    for name, template in (("user-assistant", USER_ASSISTANT_TEMPLATE), ("generation", CHATML_GENERATION_TEMPLATE),
                           ("unstable", UNSTABLE_TEMPLATE)):
        found[name] = load_tokenizer(root / "chatml")
        found[name].chat_template = template
    return found


class Pieces:
    """Builds expected (input_ids, labels) from text pieces: prompt pieces carry no loss."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.ids: list[int] = []
        self.labels: list[int] = []

    def text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt(self, *parts: str | int) -> "Pieces":
        for part in parts:
            ids = [part] if isinstance(part, int) else self.text(part)
            self.ids += ids
            self.labels += [IGNORE_INDEX] * len(ids)
        return self

    def answer(self, *parts: str | int) -> "Pieces":
        for part in parts:
            ids = [part] if isinstance(part, int) else self.text(part)
            self.ids += ids
            self.labels += ids
        return self

    def chatml_turn(self, role: str, content: str) -> "Pieces":
        return self.prompt(self.start, f"{role}\n{content}", self.end, "\n")

    def chatml_answer(self, content: str) -> "Pieces":
        return self.prompt(self.start, "assistant\n").answer(content, self.end).prompt("\n")

    def chatml_context_answer(self, content: str) -> "Pieces":
        return self.prompt(self.start, "assistant\n", content, self.end, "\n")


def expect_alpaca_no_system(p: Pieces) -> Pieces:
    return p.chatml_turn("system", TINY_SYSTEM).chatml_turn("user", Q1).chatml_answer(A1)


def expect_alpaca_system(p: Pieces) -> Pieces:
    return p.chatml_turn("system", "Be brief.").chatml_turn("user", Q1).chatml_answer(A1)


def expect_three_turns_all(p: Pieces) -> Pieces:
    p.chatml_turn("system", TINY_SYSTEM)
    for question, answer in ((Q1, A1), (Q2, A2), (Q3, A3)):
        p.chatml_turn("user", question).chatml_answer(answer)
    return p


def expect_three_turns_last(p: Pieces) -> Pieces:
    p.chatml_turn("system", TINY_SYSTEM)
    for question, answer in ((Q1, A1), (Q2, A2)):
        p.chatml_turn("user", question).chatml_context_answer(answer)
    return p.chatml_turn("user", Q3).chatml_answer(A3)


def expect_user_assistant(p: Pieces) -> Pieces:
    return p.prompt(f"User: {Q1}\nAssistant:").answer(f" {A1}", p.end).prompt("\n")


def expect_plain_base(p: Pieces) -> Pieces:
    # BOS once (the tokenizer adds it by itself), the EOS after the answer carries loss.
    return p.prompt(p.start, f"### Instruction:\n{Q1}\n\n### Response:\n").answer(A1, p.end)


def expect_plain_multi_turn(p: Pieces) -> Pieces:
    p.prompt(p.start, f"Be brief.\n\n### Instruction:\n{Q1}\n\n### Response:\n").answer(A1, p.end)
    return p.prompt(f"\n\n### Instruction:\n{Q2}\n\n### Response:\n").answer(A2, p.end)


def expect_system_none(p: Pieces) -> Pieces:
    return p.chatml_turn("user", Q1).chatml_answer(A1)


def expect_system_custom(p: Pieces) -> Pieces:
    return p.chatml_turn("system", "Answer in French.").chatml_turn("user", Q1).chatml_answer(A1)


CASES = {
    "alpaca-no-system": ("chatml", chat(Q1, A1), {}, expect_alpaca_no_system),
    "alpaca-with-system": ("chatml", chat(Q1, A1, system="Be brief."), {}, expect_alpaca_system),
    "three-turns-all-assistant": ("chatml", chat(Q1, A1, Q2, A2, Q3, A3), {}, expect_three_turns_all),
    "three-turns-last-assistant": (
        "chatml", chat(Q1, A1, Q2, A2, Q3, A3), {"train_on": "last_assistant"}, expect_three_turns_last,
    ),
    "template-without-generation-markers": ("user-assistant", chat(Q1, A1), {}, expect_user_assistant),
    "template-with-generation-markers": ("generation", chat(Q1, A1), {}, expect_alpaca_no_system),
    "chatml-bos-not-doubled": ("chatml-bos", chat(Q1, A1), {}, expect_alpaca_no_system),
    "base-model-plain-template": ("base", chat(Q1, A1), {}, expect_plain_base),
    "plain-template-multi-turn": ("base", chat(Q1, A1, Q2, A2, system="Be brief."), {}, expect_plain_multi_turn),
    "forced-plain-on-chat-model": ("chatml-bos", chat(Q1, A1), {"chat_template": "plain"}, expect_plain_base),
    "system-none-removes-template-default": (
        "chatml", chat(Q1, A1, system="Be brief."), {"system_prompt_mode": "none"}, expect_system_none,
    ),
    "system-custom": (
        "chatml", chat(Q1, A1, system="Be brief."),
        {"system_prompt_mode": "custom", "system_prompt": "Answer in French."}, expect_system_custom,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_token_exact_ids_and_labels(tokenizers, name):
    tokenizer_name, messages, options, expect = CASES[name]
    tokenizer = tokenizers[tokenizer_name]
    expected = expect(Pieces(tokenizer))
    result = encode_example(messages, tokenizer, TemplateOptions(**options))
    assert isinstance(result, EncodedExample)
    assert result.input_ids == expected.ids
    assert result.labels == expected.labels
    assert not result.truncated


@pytest.mark.parametrize("name", ["alpaca-no-system", "three-turns-all-assistant", "base-model-plain-template",
                                  "template-without-generation-markers", "system-none-removes-template-default"])
def test_prompt_ids_are_the_training_prefix(tokenizers, name):
    """The evaluate stage's prompt is exactly what preceded the last answer in training."""
    tokenizer_name, messages, options, _ = CASES[name]
    tokenizer, options = tokenizers[tokenizer_name], TemplateOptions(**options)
    result = encode_example(messages, tokenizer, options)
    prompt = render_prompt_ids(messages, tokenizer, options)
    last_answer = len(prompt)
    assert result.input_ids[:last_answer] == prompt
    assert result.labels[last_answer] != IGNORE_INDEX and result.labels[last_answer - 1] == IGNORE_INDEX


def test_prompt_ids_match_apply_chat_template(tokenizers):
    tokenizer = tokenizers["chatml"]
    messages = chat(Q1, A1, Q2, A2)
    expected = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert render_prompt_ids(messages, tokenizer, TemplateOptions()) == list(expected)


def test_bos_exactly_once(tokenizers):
    bos = tokenizers["base"].bos_token_id
    result = encode_example(chat(Q1, A1), tokenizers["base"], TemplateOptions())
    assert result.input_ids[0] == bos and result.input_ids.count(bos) == 1
    chatml = encode_example(chat(Q1, A1), tokenizers["chatml-bos"], TemplateOptions())
    assert chatml.input_ids[:2] != [bos, bos]


def test_pad_equals_eos_and_eos_carries_loss(tokenizers):
    tokenizer = tokenizers["chatml"]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    result = encode_example(chat(Q1, A1), tokenizer, TemplateOptions())
    eos_positions = [i for i, token in enumerate(result.input_ids) if token == tokenizer.eos_token_id]
    assert result.labels[eos_positions[-1]] == tokenizer.eos_token_id  # the answer's end marker
    assert all(result.labels[i] == IGNORE_INDEX for i in eos_positions[:-1])  # prompt turn ends
    assert result.labels[-1] == IGNORE_INDEX  # the newline after <|im_end|>


def test_truncate_response_keeps_end_marker(tokenizers):
    tokenizer = tokenizers["chatml"]
    full = expect_alpaca_no_system(Pieces(tokenizer))
    prompt_length = full.labels.index(next(label for label in full.labels if label != IGNORE_INDEX))
    answer = Pieces(tokenizer).text(A1)
    options = TemplateOptions(max_length=prompt_length + 3, truncation="truncate_response")
    result = encode_example(chat(Q1, A1), tokenizer, options)
    end = tokenizer.eos_token_id
    assert result.truncated
    assert result.input_ids == full.ids[:prompt_length] + answer[:2] + [end]
    assert result.labels == [IGNORE_INDEX] * prompt_length + answer[:2] + [end]


def test_truncate_response_only_trailing_newline(tokenizers):
    tokenizer = tokenizers["chatml"]
    full = expect_alpaca_no_system(Pieces(tokenizer))
    options = TemplateOptions(max_length=len(full.ids) - 1, truncation="truncate_response")
    result = encode_example(chat(Q1, A1), tokenizer, options)
    assert result.input_ids == full.ids[:-1] and result.labels == full.labels[:-1]


@pytest.mark.parametrize(
    "truncation, room, reason",
    [("truncate_response", 1, "no_loss_tokens"), ("truncate_response", 0, "no_loss_tokens"), ("drop", 5, "too_long")],
)
def test_rows_that_do_not_fit_are_dropped(tokenizers, truncation, room, reason):
    """Room for the end marker only: truncation would empty the answer, so the row is dropped."""
    tokenizer = tokenizers["chatml"]
    full = expect_alpaca_no_system(Pieces(tokenizer))
    prompt_length = full.labels.index(next(label for label in full.labels if label != IGNORE_INDEX))
    options = TemplateOptions(max_length=max(8, prompt_length + room), truncation=truncation)
    result = encode_example(chat(Q1, A1), tokenizer, options)
    assert result == Dropped(reason, len(full.ids))


def test_row_without_assistant_turn_is_dropped(tokenizers):
    result = encode_example(chat(Q1), tokenizers["chatml"], TemplateOptions())
    assert isinstance(result, Dropped) and result.reason == "no_loss_tokens"


def test_unstable_template_fails_loudly_naming_the_row(tokenizers):
    rows = [chat(Q1, A1), chat(Q2, A2)]
    with pytest.raises(TemplateError, match=r"data\.jsonl:7.*prefixes"):
        encode_batch(rows, tokenizers["unstable"], TemplateOptions(), ["data.jsonl:7", "data.jsonl:8"])


def test_forcing_model_template_without_one_fails(tokenizers):
    with pytest.raises(TemplateError, match="no chat template"):
        encode_example(chat(Q1, A1), tokenizers["base"], TemplateOptions(chat_template="model"))


def test_batch_equals_single_rows(tokenizers):
    rows = [chat(Q1, A1), chat(Q2, A2, Q3, A3, system="Be brief."), chat(Q3)]
    tokenizer, options = tokenizers["chatml"], TemplateOptions()
    assert encode_batch(rows, tokenizer, options) == [encode_example(row, tokenizer, options) for row in rows]
