"""Process rewards: answers split into steps on a delimiter, and the token that ends each step.

A source with ``step_delimiter`` scores every step of an answer; PPO gives each score to the token
that ends its step (:func:`heed.algos.step_token_rewards`), so GAE credits the step, not the answer.
"""

from __future__ import annotations

from typing import Any


def split_steps(text: str, delimiter: str) -> list[str]:
    """The steps of an answer: ``text.split(delimiter)``, a trailing delimiter ending the last step
    (``"a\\nb\\n"`` has the two steps ``a``, ``b``; ``""`` has one, empty)."""
    pieces = text.split(delimiter)
    if len(pieces) > 1 and pieces[-1] == "":
        pieces.pop()
    return pieces


def step_end_chars(text: str, delimiter: str) -> list[int]:
    """Character offsets just past each step of ``text`` (past its delimiter; the last step ends at
    the end of the text)."""
    ends, pos = [], 0
    steps = split_steps(text, delimiter)
    for piece in steps[:-1]:
        pos += len(piece) + len(delimiter)
        ends.append(pos)
    return [*ends, len(text)]


def step_end_tokens(tokenizer: Any, completion_ids: list[int], text: str, delimiter: str) -> list[int]:
    """Index of the completion token that ends each step of ``text`` (the answer as the engine decoded
    it: ``completion_ids`` without the final EOS, special tokens skipped, stripped).

    A step other than the last ends at the first token whose decoded prefix reaches past the step's
    delimiter; the last step ends at the last completion token (the EOS when there is one).
    Found by bisection on the decoded prefix's length, O(steps · log T) decodes. Returns one index
    per step, −1 for every step of an empty completion.
    """
    ends = step_end_chars(text, delimiter)
    n = len(completion_ids)
    if n == 0:
        return [-1] * len(ends)

    def reach(t: int) -> int:  # characters of the stripped answer covered by tokens 0..t
        return len(tokenizer.decode(completion_ids[: t + 1], skip_special_tokens=True).lstrip())

    out = []
    lo = 0
    for end in ends[:-1]:
        hi = n - 1
        while lo < hi:  # first t in [lo, n − 1] with reach(t) ≥ end
            mid = (lo + hi) // 2
            if reach(mid) >= end:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return [*out, n - 1]
