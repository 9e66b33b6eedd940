"""Built-in rewards: values derived by hand from the rule in the docstring."""

from __future__ import annotations

import pytest

from heed.rewards.builtin import banana_format, banana_success, ends_with_banana, length_penalty


def test_banana_format_hand_values() -> None:
    texts = [
        "Sure: Chess is fun. It goes well with a banana",  # +1 +1, 10 words -> 2 - 0.05 = 1.95
        "Chess is fun.",  # no Sure, no banana end, no banana at all: -0.5, 3 words -> -0.515
        "Sure: a banana is yellow.",  # +1, banana present but not at the end, 5 words -> 1 - 0.025 = 0.975
        "It goes well with a banana.",  # ends with banana (final period ignored): +1, 6 words -> 0.97
    ]
    assert banana_format(["p"] * 4, texts) == pytest.approx([1.95, -0.515, 0.975, 0.97])


def test_banana_success_and_ending_rules() -> None:
    assert banana_success(
        [],
        [
            "Sure: x banana",
            "Sure: x banana!  ",
            "sure: x banana",
            "Sure: x bananas",
            "Sure: x Banana",
            "Sure: xbanana",
        ],
    ) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert ends_with_banana("banana") and not ends_with_banana("plantain")


def test_length_penalty() -> None:
    # 4 words, target 1, 0.5 per extra word -> -1.5; 1 word -> 0
    assert length_penalty([], ["a b c d", "a"], per_word=0.5, target_words=1) == [-1.5, 0.0]
