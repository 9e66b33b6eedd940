"""heed.rewards.select: a preference pair from two scores, the best of N, every skip counted."""

from __future__ import annotations

import pytest

from heed.rewards.select import best_of_n, label_pairs


def test_label_pairs_by_hand() -> None:
    # prompt 0: 0.2 < 0.9 -> chosen row 1, rejected row 0; prompt 1: 0.5 = 0.5 -> tie, skipped;
    # prompt 2: None -> unscored, skipped; prompt 3: 3.0 > -1.0 -> chosen row 6, rejected row 7
    got = label_pairs([0.2, 0.9, 0.5, 0.5, None, 1.0, 3.0, -1.0])
    assert got.prompts == [0, 3]
    assert got.chosen == [1, 6]
    assert got.rejected == [0, 7]
    assert got.chosen_scores == [0.9, 3.0]
    assert got.rejected_scores == [0.2, -1.0]
    c = got.counts
    assert (c.prompts, c.selected, c.ties, c.unscored) == (4, 2, 1, 1)


def test_label_pairs_needs_two_scores_per_prompt() -> None:
    with pytest.raises(ValueError, match="expected 2 scores per prompt"):
        label_pairs([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least two answers"):
        label_pairs([1.0, 2.0], k=1)


def test_label_pairs_best_vs_worst_of_four_by_hand() -> None:
    # k = 4. prompt 0: [0.1, 0.7, -0.3, 0.7] -> chosen row 1 (first of the two 0.7), rejected row 2;
    # prompt 1: [None, 2.0, None, 1.0] -> the two scored ones, chosen row 5, rejected row 7;
    # prompt 2: [None, None, 4.0, None] -> one scored answer, unscored; prompt 3: all 0.5 -> tie
    got = label_pairs([0.1, 0.7, -0.3, 0.7, None, 2.0, None, 1.0, None, None, 4.0, None] + [0.5] * 4, k=4)
    assert got.prompts == [0, 1]
    assert got.chosen == [1, 5]
    assert got.rejected == [2, 7]
    assert got.chosen_scores == [0.7, 2.0]
    assert got.rejected_scores == [-0.3, 1.0]
    c = got.counts
    assert (c.prompts, c.selected, c.ties, c.unscored) == (4, 2, 1, 1)


def test_best_of_n_by_hand() -> None:
    # n = 3. prompt 0: [1, 5, 2] -> row 1; prompt 1: [None, -2, -3] -> row 4 (None never wins);
    # prompt 2: all None -> None, unscored; prompt 3: [7, 7, 1] -> the first of the tie, row 9
    best, counts = best_of_n([1.0, 5.0, 2.0, None, -2.0, -3.0, None, None, None, 7.0, 7.0, 1.0], 3)
    assert best == [1, 4, None, 9]
    assert (counts.prompts, counts.selected, counts.ties, counts.unscored) == (4, 3, 0, 1)
    with pytest.raises(ValueError, match="groups of 3"):
        best_of_n([1.0, 2.0], 3)
