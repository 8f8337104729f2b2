"""Text metrics: exact values on small strings. Tool calls: parsed from realistic model outputs
and scored against the calls of the reference answer."""

from __future__ import annotations

import pytest

from tasks.core.metrics import (
    calls_right, contains_reference, exact_match, name_right, normalize, parse_tool_calls, rouge_l, same_json,
    score_generations, score_tool_calls, token_f1,
)


def test_normalize_lowercases_drops_punctuation_and_collapses_spaces():
    assert normalize("  Hello,   World!! ") == "hello world"
    assert normalize("L'été — déjà?") == "l été déjà"
    assert normalize("2 + 2 = 4.") == "2 + 2 = 4"  # symbols are not punctuation


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [("Paris.", "paris", 1.0), ("The capital is Paris", "Paris", 0.0), ("", "", 1.0), ("a", "", 0.0)],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("the cat sat", "the cat sat", 1.0),
        ("the cat sat", "the cat ran", 2 / 3),  # p = r = 2/3
        ("cat", "the cat sat", 0.5),  # p = 1, r = 1/3
        ("the the the", "the cat", 0.4),  # overlap counts repeats once per match: p = 1/3, r = 1/2
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("", "cat", 0.0),
    ],
)
def test_token_f1(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("a b c d", "a b c d", 1.0),
        ("a b c d", "a c d", 6 / 7),  # lcs 3: p = 3/4, r = 1
        ("d c b a", "a b c d", 0.25),  # reversed: lcs 1
        ("the cat sat on the mat", "the mat the cat", 0.4),  # lcs 2 ("the cat"): p = 2/6, r = 2/4
        ("x y", "a b", 0.0),
    ],
)
def test_rouge_l(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_contains_reference_matches_whole_words_only():
    assert contains_reference("I think it is Paris, France.", "paris") == 1.0
    assert contains_reference("Parisian food", "Paris") == 0.0
    assert contains_reference("anything", "") == 0.0


def test_score_generations_averages_every_metric():
    scores = score_generations(["Paris.", "the cat"], ["paris", "the cat sat"])
    assert scores == pytest.approx(
        {"exact_match": 0.5, "token_f1": (1.0 + 0.8) / 2, "rouge_l": (1.0 + 0.8) / 2, "contains_reference": 0.5}
    )
    assert score_generations([], []) == {}
    with pytest.raises(ValueError):
        score_generations(["a"], [])


# ---------------------------------------------------------------------------------------------
# Tool calls

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TIME = {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}


@pytest.mark.parametrize(
    "text, calls",
    [
        # Qwen / Hermes, exactly as the fallback template renders a call
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>', [WEATHER]),
        # text before the call, two calls, keys in another order
        ('Let me check.\n<tool_call>\n{"arguments": {"unit": "celsius", "city": "Paris"}, "name": "get_weather"}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>', [WEATHER, TIME]),
        # Llama 3.1: a bare object with "parameters"
        ('{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', [TIME]),
        # Mistral: a list after the (decoded away) [TOOL_CALLS] token
        ('[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, {"name": "get_time", "arguments": '
         '{"timezone": "Europe/Paris"}}]', [WEATHER, TIME]),
        # OpenAI wrapper, arguments as a JSON string
        ('{"tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_time", '
         '"arguments": "{\\"timezone\\": \\"Europe/Paris\\"}"}}]}', [TIME]),
        # a call whose arguments hold an object with "name" and "arguments": still one call
        ('{"name": "log", "arguments": {"entry": {"name": "x", "arguments": {}}}}',
         [{"name": "log", "arguments": {"entry": {"name": "x", "arguments": {}}}}]),
        # arguments as a string that is not JSON stay a string
        ('{"name": "echo", "arguments": "hello"}', [{"name": "echo", "arguments": "hello"}]),
    ],
)
def test_tool_calls_are_found_in_every_common_markup(text, calls):
    assert parse_tool_calls(text) == calls


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The weather in Paris is sunny, 21 degrees.",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',  # cut off by max_new_tokens
        "{{{ not json } at all {",
        '{"name": "Ada Lovelace", "born": 1815}',  # an object with a name is data, not a call
        '{"arguments": {"city": "Paris"}}',  # no function name
        '{"name": "", "arguments": {}}',
        "<tool_call>\nget_weather(city='Paris')\n</tool_call>",  # pythonic calls are not JSON
    ],
)
def test_text_without_a_well_formed_call_yields_none(text):
    assert parse_tool_calls(text) == []


def test_arguments_compare_as_parsed_json():
    assert same_json({"a": 1, "b": [1, {"c": None}]}, {"b": [1.0, {"c": None}], "a": 1})
    assert not same_json({"flag": True}, {"flag": 1})  # Python's == says True == 1; JSON does not
    assert not same_json({"n": "1"}, {"n": 1})
    assert not same_json({"a": 1}, {"a": 1, "b": 2})
    assert not same_json([1, 2], [2, 1])


@pytest.mark.parametrize(
    "text, name, call",
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>', True, True),
        ('{"name": "get_weather", "arguments": "{\\"unit\\": \\"celsius\\", \\"city\\": \\"Paris\\"}"}', True, True),
        ('<tool_call>\n{"name": "get_forecast", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>', False, False),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "London", "unit": "celsius"}}\n</tool_call>', True, False),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', True, False),  # missing argument
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>', True, False),  # extra call
        ("It is sunny in Paris.", False, False),
    ],
)
def test_one_expected_call_against_one_answer(text, name, call):
    predicted = parse_tool_calls(text)
    assert name_right(predicted, [WEATHER]) is name
    assert calls_right(predicted, [WEATHER]) is call


def test_several_expected_calls_must_all_be_made_in_order():
    assert calls_right([WEATHER, TIME], [WEATHER, TIME])
    assert not calls_right([TIME, WEATHER], [WEATHER, TIME])
    assert not calls_right([WEATHER], [WEATHER, TIME])  # a missing call
    assert name_right([WEATHER], [WEATHER, TIME])  # the name metric looks at the first call only


def test_tool_metrics_average_only_over_answers_whose_reference_ends_in_calls():
    right = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    wrong_args = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius"}}\n</tool_call>'
    answers = [right, wrong_args, "Paris.", "garbage {"]
    expected = [[WEATHER], [WEATHER], [], [TIME]]
    assert score_tool_calls(answers, expected) == pytest.approx({"tool_name_accuracy": 2 / 3, "tool_call_accuracy": 1 / 3})
    assert score_tool_calls(["Paris."], [[]]) == {}  # unknown, not 0
    with pytest.raises(ValueError):
        score_tool_calls(answers, expected[:2])


def test_score_generations_adds_tool_metrics_only_when_some_reference_ends_in_calls():
    right = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>'
    scores = score_generations([right, "Paris."], [right, "paris"], [[TIME], []])
    assert scores["tool_name_accuracy"] == scores["tool_call_accuracy"] == 1.0
    assert scores["exact_match"] == 1.0
    plain = score_generations(["Paris."], ["paris"], [[]])
    assert plain == score_generations(["Paris."], ["paris"]) and "tool_call_accuracy" not in plain
