"""Agreement statistics against textbook examples with known values."""

from __future__ import annotations

import math

import pytest

from heed.feedback import agreement as ag


def test_cohen_kappa_wikipedia_example() -> None:
    # 50 items, two readers: yes/yes 20, yes/no 5, no/yes 10, no/no 15 (Wikipedia, "Cohen's kappa").
    # p_o = (20 + 15) / 50 = 0.7; reader A says yes 25/50, B says yes 30/50:
    # p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert ag.cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_edges() -> None:
    assert ag.cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    # perfect disagreement on a balanced pair: p_o = 0, p_e = 0.5 -> kappa = -1
    assert ag.cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert math.isnan(ag.cohen_kappa(["a", "a"], ["a", "a"]))  # p_e = 1: undefined
    assert math.isnan(ag.cohen_kappa([], []))
    with pytest.raises(ValueError):
        ag.cohen_kappa(["a"], ["a", "b"])


def test_fleiss_kappa_wikipedia_example() -> None:
    # Fleiss (1971) worked example as on Wikipedia: 10 subjects, 14 raters, 5 categories.
    # P_bar = 0.378, P_e = 0.213, kappa = (0.378 - 0.213) / (1 - 0.213) = 0.210.
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    assert ag.fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_small_by_hand() -> None:
    # 2 items x 2 raters, labels (a, a) and (a, b):
    # P_1 = (4 - 2) / 2 = 1, P_2 = (1 + 1 - 2) / 2 = 0, P_bar = 0.5;
    # p_a = 3/4, p_b = 1/4, P_e = 9/16 + 1/16 = 10/16; kappa = (0.5 - 0.625) / 0.375 = -1/3.
    table = ag.counts_table([["a", "a"], ["a", "b"]], ["a", "b"])
    assert table == [[2, 0], [1, 1]]
    assert ag.fleiss_kappa(table) == pytest.approx(-1 / 3)
    assert math.isnan(ag.fleiss_kappa([[1, 0]]))  # one rating per item carries no information


N = None
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers,
# 12 units, values 1-5, missing data. Published: nominal 0.743, ordinal 0.815, interval 0.849, ratio 0.797.
KRIPPENDORFF_2011 = list(
    zip(
        [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
        [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
        strict=True,
    )
)


@pytest.mark.parametrize(
    ("level", "expected"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849), ("ratio", 0.797)]
)
def test_krippendorff_alpha_published_example(level: str, expected: float) -> None:
    assert ag.krippendorff_alpha(KRIPPENDORFF_2011, level) == pytest.approx(expected, abs=5e-4)  # type: ignore[arg-type]


def test_krippendorff_alpha_ordinal_mixes_ints_and_floats() -> None:
    # Values 1 < 1.5 < 2 (ints and floats mixed). Coincidences: o(1,1.5) = o(1.5,1) = 1,
    # o(1.5,2) = o(2,1.5) = 1, o(2,2) = 2, so n_1 = 1, n_1.5 = 2, n_2 = 3, n = 6.
    # Ordinal d2: (1,1.5) = (3 - 1.5)^2 = 2.25; (1.5,2) = (5 - 2.5)^2 = 6.25; (1,2) = (6 - 2)^2 = 16.
    # D_o = 2*2.25 + 2*6.25 = 17; D_e = 2*(1*2*2.25 + 2*3*6.25 + 1*3*16) = 180;
    # alpha = 1 - (n - 1) * 17 / 180 = 1 - 85/180 = 0.52778.
    units = [[1, 1.5], [1.5, 2], [2, 2]]
    assert ag.krippendorff_alpha(units, "ordinal") == pytest.approx(1 - 85 / 180)


def test_krippendorff_alpha_by_hand() -> None:
    # Units (1, 1), (1, 2), two coders, nominal. Coincidences: unit 1 adds o_11 = 2; unit 2 adds
    # o_12 = o_21 = 1. n_1 = 3, n_2 = 1, n = 4. D_o ~ sum o_ck d = 2; D_e ~ sum n_c n_k d = 3 + 3 = 6.
    # alpha = 1 - (n - 1) * 2 / 6 = 1 - 3 * 2 / 6 = 0.
    assert ag.krippendorff_alpha([[1, 1], [1, 2]], "nominal") == pytest.approx(0.0)
    assert ag.krippendorff_alpha([[1, 1], [2, 2]], "interval") == pytest.approx(1.0)
    assert math.isnan(ag.krippendorff_alpha([[1, 1], [1, 1]], "nominal"))
    assert math.isnan(ag.krippendorff_alpha([[1, None], [2, None]], "nominal"))  # nothing pairable


def test_kendall_tau_b() -> None:
    # no ties: one discordant pair of 6: (5 - 1) / 6
    assert ag.kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # ties: x = [1,1,2,3], y = [1,2,2,3]: 4 concordant, 0 discordant, 1 pair tied in x, 1 tied in y:
    # tau_b = 4 / sqrt((6 - 1)(6 - 1)) = 0.8
    assert ag.kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert ag.kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(ag.kendall_tau_b([1, 1], [1, 2]))


def test_mean_kendall_tau_and_light_kappa() -> None:
    # record 1: three identical rankings (tau 1 for all three pairs); record 2: two reversed (tau -1)
    assert ag.mean_kendall_tau([[[1, 2, 3]] * 3, [[1, 2], [2, 1]]]) == pytest.approx(0.0)
    labels = {"a": {1: "x", 2: "y"}, "b": {1: "x", 2: "y"}, "c": {1: "y", 2: "x"}}
    # pairs: (a, b) kappa 1; (a, c) -1; (b, c) -1 -> mean -1/3
    assert ag.mean_pairwise_cohen_kappa(labels) == pytest.approx(-1 / 3)


def test_rank_helpers() -> None:
    assert ag.fractional_ranks([1, 2, 2, 3]) == [1.0, 2.5, 2.5, 4.0]
    assert ag.fractional_ranks([1, 2, 2, 4]) == [1.0, 2.5, 2.5, 4.0]
    assert ag.dense_ranks([0.5, 2.0, 2.0, 3.1]) == [1, 2, 2, 3]
    assert ag.dense_ranks([0.5, 2.0, 2.0, 3.1], lower_is_better=False) == [3, 2, 2, 1]
