"""Text metrics: exact values on small strings."""

from __future__ import annotations

import pytest

from tasks.core.metrics import contains_reference, exact_match, normalize, rouge_l, score_generations, token_f1


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
