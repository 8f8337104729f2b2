"""Text and tool-call metrics for generated answers, implemented here so no metric needs a download.

All text metrics compare a prediction with a reference after the same normalisation: lower case,
punctuation replaced by spaces, whitespace collapsed (SQuAD-style, but without dropping English
articles, so it behaves the same in every language). Tokens are the words left after that.

>>> normalize("The  Capital, of France!")
'the capital of france'
>>> exact_match("Paris.", "paris"), token_f1("the cat sat", "the cat ran"), rouge_l("a b c d", "a c d")
(1.0, 0.6666666666666666, 0.8571428571428571)

Tool calls are read from the generated text whatever the markup (`parse_tool_calls`): every JSON
object in it that names a function and gives its arguments is a call, in order, so Hermes/Qwen
`<tool_call>` blocks, Llama's bare `{"name", "parameters"}`, Mistral's list and OpenAI's
`{"function": ...}` wrapper are all found.

>>> parse_tool_calls('Sure. <tool_call> {"name": "get_weather", "arguments": {"city": "Paris"}} </tool_call>')
[{'name': 'get_weather', 'arguments': {'city': 'Paris'}}]
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from typing import Any, Callable, Sequence

TOOL_METRICS = ("tool_name_accuracy", "tool_call_accuracy")
HIGHER_IS_BETTER = {
    "exact_match": True, "token_f1": True, "rouge_l": True, "contains_reference": True,
    "tool_name_accuracy": True, "tool_call_accuracy": True, "eval_loss": False, "perplexity": False,
}


def normalize(text: str) -> str:
    """Lower case, every punctuation character (Unicode category P*) becomes a space, whitespace collapsed."""
    chars = [" " if unicodedata.category(char).startswith("P") else char for char in text.lower()]
    return " ".join("".join(chars).split())


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def contains_reference(prediction: str, reference: str) -> float:
    """1.0 when the normalised reference occurs in the normalised prediction as whole words."""
    ref = normalize(reference)
    return float(bool(ref) and f" {ref} " in f" {normalize(prediction)} ")


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of word precision and recall, counting repeated words (bag of words).
    Two empty texts agree (1.0); one empty text scores 0.0."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common word subsequence, harmonic mean of its precision and recall
    (the `fmeasure` of the rouge-score package, with our normalisation)."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


TEXT_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "contains_reference": contains_reference,
}


def score_generations(
    predictions: Sequence[str], references: Sequence[str], expected_calls: Sequence[list[dict]] | None = None
) -> dict[str, float]:
    """Mean of every text metric over prediction/reference pairs (empty when there are none), and
    the tool-call metrics when `expected_calls` (parallel, [] where the reference has no call) is given."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    scores = {
        name: sum(metric(p, r) for p, r in zip(predictions, references)) / len(predictions)
        for name, metric in TEXT_METRICS.items()
    }
    if expected_calls is not None:
        scores.update(score_tool_calls(predictions, expected_calls))
    return scores


# ---------------------------------------------------------------------------------------------
# Tool calls


def as_call(value: Any) -> dict | None:
    """{"name", "arguments"} of one call written in any common shape, or None when `value` is not a
    call: {"name", "arguments"|"parameters"} or OpenAI's {"function": {...}}. Arguments given as a
    JSON string are parsed (a string that is not JSON stays a string, and then matches nothing)."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):
        return as_call(value["function"])
    name = value.get("name")
    key = "arguments" if "arguments" in value else "parameters" if "parameters" in value else None
    if not isinstance(name, str) or not name or key is None:
        return None  # a JSON object that names no function, or gives no arguments, is data, not a call
    arguments = value[key]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return {"name": name, "arguments": arguments}


def parse_tool_calls(text: str) -> list[dict]:
    """Every tool call in a generated text, in order. A JSON object is tried at each "{": a call is
    taken whole (its arguments are not searched again); any other object is searched inside, so a
    wrapper such as {"tool_calls": [...]} still yields its calls. Broken JSON yields no call."""
    decoder, calls, position = json.JSONDecoder(), [], text.find("{")
    while position != -1:
        try:
            value, end = decoder.raw_decode(text, position)
        except ValueError:
            value, end = None, position + 1
        call = as_call(value)
        if call is not None:
            calls.append(call)
        position = text.find("{", end if call is not None else position + 1)
    return calls


def same_json(a: Any, b: Any) -> bool:
    """Equality of parsed JSON values: key order is ignored and 1 equals 1.0, but true is not 1
    (Python's == would say it is)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def name_right(predicted: Sequence[dict], expected: Sequence[dict]) -> bool:
    """The first predicted call names the function of the first expected call."""
    return bool(predicted) and bool(expected) and predicted[0]["name"] == expected[0]["name"]


def calls_right(predicted: Sequence[dict], expected: Sequence[dict]) -> bool:
    """As many calls as expected, each with the expected name and arguments, in order."""
    return len(predicted) == len(expected) and all(
        p["name"] == e["name"] and same_json(p["arguments"], e["arguments"]) for p, e in zip(predicted, expected)
    )


def score_tool_calls(predictions: Sequence[str], expected_calls: Sequence[list[dict]]) -> dict[str, float]:
    """Tool-call metrics averaged over the samples whose reference ends in a call; empty when
    none does (a metric over no such sample is unknown, not 0)."""
    if len(predictions) != len(expected_calls):
        raise ValueError(f"{len(predictions)} predictions for {len(expected_calls)} expected call lists")
    pairs = [(parse_tool_calls(p), expected) for p, expected in zip(predictions, expected_calls) if expected]
    if not pairs:
        return {}
    return {
        "tool_name_accuracy": sum(name_right(p, e) for p, e in pairs) / len(pairs),
        "tool_call_accuracy": sum(calls_right(p, e) for p, e in pairs) / len(pairs),
    }
