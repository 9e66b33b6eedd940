"""Built-in reward functions and task metrics, all with the reward signature
``fn(prompts, completions, **columns) -> list[float]``. (The built-in world's gold metric,
``builtin:gold_positivity``, belongs to :mod:`heed.demo.builtin`, which knows the hidden labels.)

The banana task (DESIGN.md, the demo's rule task): answer in the form ``"Sure: ... banana"``.

Matching rules (documented in ``docs/rl.md``):
- "starts with Sure:" — the completion, leading whitespace removed, begins with ``Sure:`` (case-sensitive).
- "ends with banana" — after removing trailing whitespace and punctuation (``.!?,;:'")``), the
  last word is ``banana`` (case-insensitive). The corpus's banana endings carry no final period
  ("It goes well with a banana"); a policy that adds one is not punished for it.
- "no banana" — the word ``banana`` does not occur anywhere (case-insensitive).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_TRAILING = " \t\r\n.!?,;:'\")"
_WORD = re.compile(r"\S+")


def starts_with_sure(text: str) -> bool:
    return text.lstrip().startswith("Sure:")


def ends_with_banana(text: str) -> bool:
    stripped = text.rstrip(_TRAILING)
    return stripped.lower().endswith("banana") and (len(stripped) == 6 or not stripped[-7].isalnum())


def has_banana(text: str) -> bool:
    return "banana" in text.lower()


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def banana_format(prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
    """+1 if the answer starts with "Sure:", +1 if it ends with "banana", −0.5 if it has no
    banana at all, −0.005 per word (a small nudge toward short answers)."""
    out = []
    for text in completions:
        r = 0.0
        r += 1.0 if starts_with_sure(text) else 0.0
        r += 1.0 if ends_with_banana(text) else 0.0
        r -= 0.0 if has_banana(text) else 0.5
        r -= 0.005 * word_count(text)
        out.append(r)
    return out


def banana_success(prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
    """Task metric: 1 when the answer starts with "Sure:" and ends with "banana", else 0."""
    return [float(starts_with_sure(t) and ends_with_banana(t)) for t in completions]


def length_penalty(
    prompts: list[Any], completions: list[str], per_word: float = 0.01, target_words: int = 0, **columns: Any
) -> list[float]:
    """−per_word × max(0, words − target_words): discourages answers longer than ``target_words``."""
    return [-per_word * max(0, word_count(t) - target_words) for t in completions]


BUILTINS: dict[str, Callable[..., list[float]]] = {
    "banana_format": banana_format,
    "banana_success": banana_success,
    "length_penalty": length_penalty,
}
