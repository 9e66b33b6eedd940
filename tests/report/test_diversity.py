import math

import pytest

from heed.report.diversity import (
    distinct_n,
    diversity_metrics,
    duplicate_fraction,
    mean_words,
    ngram_counts,
    pearson,
)

TEXTS = ["the cat sat", "The cat ran", "a dog"]


def test_distinct_n_hand_derived():
    # words: [the cat sat] [the cat ran] [a dog] (lower-cased)
    # unigrams: 8 in all; distinct {the, cat, sat, ran, a, dog} = 6 -> 6/8
    assert ngram_counts(TEXTS, 1) == (6, 8)
    assert distinct_n(TEXTS, 1) == pytest.approx(0.75)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) (a dog) = 5; distinct 4 -> 4/5
    # (no bigram spans two answers: "sat the" is not counted)
    assert ngram_counts(TEXTS, 2) == (4, 5)
    assert distinct_n(TEXTS, 2) == pytest.approx(0.8)


def test_distinct_n_edge_cases():
    assert distinct_n([], 2) == 0.0
    assert distinct_n(["one", "two"], 2) == 0.0  # no bigrams at all
    assert distinct_n(["a b c d"], 2) == 1.0
    with pytest.raises(ValueError):
        distinct_n(TEXTS, 0)


def test_duplicate_fraction_normalises_case_and_spaces():
    # "Hello  world" and "hello world" are the same answer: 3 answers, 2 unique -> 1/3
    assert duplicate_fraction(["Hello  world", "hello world", "bye"]) == pytest.approx(1 / 3)
    assert duplicate_fraction(["x"] * 4) == pytest.approx(3 / 4)
    assert duplicate_fraction([]) == 0.0


def test_mean_words_and_metrics_keys():
    # 3 + 3 + 2 words over 3 answers
    assert mean_words(TEXTS) == pytest.approx(8 / 3)
    m = diversity_metrics(TEXTS)
    assert m == {
        "diversity/distinct_1": pytest.approx(0.75),
        "diversity/distinct_2": pytest.approx(0.8),
        "diversity/duplicate_frac": 0.0,
        "length/words": pytest.approx(8 / 3),
    }


def test_pearson_hand_derived():
    # x=[1,2,3], y=[2,4,7]: dx=[-1,0,1], dy=[-7/3,-1/3,8/3]; sxy=5, sxx=2, syy=114/9
    # r = 5 / sqrt(2 * 114/9) = 15 / sqrt(228)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1], [2]) is None
