"""heed.algos.ops.kendall_tau and top1_accuracy: reward-model ranking metrics."""

from __future__ import annotations

import math

import torch

from heed.algos.ops import kendall_tau, top1_accuracy

T = torch.tensor


def test_kendall_tau_perfect_reversed_and_one_swap():
    ranks = T([[1, 2, 3, 4]] * 3)
    mask = torch.ones(3, 4, dtype=torch.bool)
    scores = T(
        [
            [4.0, 3.0, 2.0, 1.0],  # same order as the humans: all 6 pairs concordant -> 1
            [1.0, 2.0, 3.0, 4.0],  # reversed: all 6 discordant -> -1
            [3.0, 4.0, 2.0, 1.0],  # responses 0 and 1 swapped: C = 5, D = 1 -> (5 - 1) / 6 = 2/3
        ]
    )
    torch.testing.assert_close(kendall_tau(scores, ranks, mask), T([1.0, -1.0, 2 / 3]))


def test_kendall_tau_b_with_ties_and_padding():
    # ranks (1, 2, 2) and scores (3, 2, 1), third slot of a K=4 row padded.
    # pairs: (0,1) concordant, (0,2) concordant, (1,2) tied in rank -> C − D = 2
    # n0 = 3, n1 = 1 (rank tie), n2 = 0 -> τ_b = 2 / sqrt(2 · 3) = 0.816497
    scores = T([[3.0, 2.0, 1.0, 99.0]])
    ranks = T([[1, 2, 2, 1]])
    mask = T([[True, True, True, False]])
    torch.testing.assert_close(kendall_tau(scores, ranks, mask), T([2 / math.sqrt(6)]))


def test_kendall_tau_undefined_is_zero():
    # all scores tied: n2 = n0, the denominator is 0 -> 0 by convention
    assert kendall_tau(T([[1.0, 1.0]]), T([[1, 2]]), T([[True, True]])).item() == 0.0


def test_top1_accuracy():
    scores = T(
        [
            [0.1, 0.9, 0.3],  # best score on response 1, whose rank 1 is the best -> 1
            [0.9, 0.1, 0.3],  # best score on response 0 (rank 2); the best rank is 1 -> 0
            [0.2, 0.5, 7.0],  # response 2 is padding: it is ignored; response 1 (rank 1) wins -> 1
        ]
    )
    ranks = T([[2, 1, 3], [2, 1, 1], [2, 1, 1]])
    mask = T([[True, True, True], [True, True, True], [True, True, False]])
    torch.testing.assert_close(top1_accuracy(scores, ranks, mask), T([1.0, 0.0, 1.0]))
