"""Text metrics for generated answers, implemented here so no metric needs a download.

All metrics compare a prediction with a reference after the same normalisation: lower case,
punctuation replaced by spaces, whitespace collapsed (SQuAD-style, but without dropping English
articles, so it behaves the same in every language). Tokens are the words left after that.

>>> normalize("The  Capital, of France!")
'the capital of france'
>>> exact_match("Paris.", "paris"), token_f1("the cat sat", "the cat ran"), rouge_l("a b c d", "a c d")
(1.0, 0.6666666666666666, 0.8571428571428571)
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Callable, Sequence

HIGHER_IS_BETTER = {"exact_match": True, "token_f1": True, "rouge_l": True, "contains_reference": True, "eval_loss": False, "perplexity": False}


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


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean of every text metric over prediction/reference pairs (empty when there are none)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    return {
        name: sum(metric(p, r) for p, r in zip(predictions, references)) / len(predictions)
        for name, metric in TEXT_METRICS.items()
    }
