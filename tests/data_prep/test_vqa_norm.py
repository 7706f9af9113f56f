import pytest

from data_prep.vqa_norm import majority_answer, normalize_answer


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("  yes!\n", "yes"),
        ("two", "2"),
        ("None", "0"),
        ("ten", "10"),
        ("the red", "red"),
        ("A dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("1,000", "1000"),  # a digit comma: punctuation is removed, not spaced
        ("3.5", "3.5"),  # a period before a digit stays
        ("hi-fi", "hi fi"),  # punctuation inside a word becomes a space
        ("red , blue", "red blue"),  # punctuation next to a space is removed
        ("on the left", "on left"),
    ],
)
def test_official_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_majority_counts_normalised_forms_together():
    answers = ["Two", "2", "two.", "3", "3", "3"]
    assert majority_answer(answers) == "2"
    assert majority_answer(["yes", "no"]) == "yes"  # tie: first seen
    assert majority_answer([]) is None
    assert majority_answer(["", "  "]) is None
