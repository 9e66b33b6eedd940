"""Held-out splits of a training set, seeded so that a resumed run holds out the same records."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any, TypeVar

from heed.errors import DataError

T = TypeVar("T")


def split_eval(examples: Sequence[T], frac: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out ``frac`` of the records (at least one, seeded); returns ``(train, held_out)`` in order."""
    if frac <= 0 or len(examples) < 2:
        return list(examples), []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    held = set(idx[: max(1, int(len(examples) * frac))])
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]


def prompt_key(prompt: Any) -> str:
    """A prompt as a string key: plain text as is, chat messages as their JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def split_by_prompt(groups: Sequence[T], frac: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out ``frac`` of the distinct prompts (seeded): no prompt is in both splits.

    ``groups`` are records with a ``prompt`` attribute (preference groups, pairs)."""
    if frac <= 0:
        return list(groups), []
    prompts = sorted({prompt_key(g.prompt) for g in groups})  # type: ignore[attr-defined]
    if len(prompts) < 2:
        raise DataError(
            f"data.eval_split={frac}: the training data has only {len(prompts)} distinct prompt; "
            "set data.eval to an evaluation file or data.eval_split: 0"
        )
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(len(prompts) * frac))])
    return [g for g in groups if prompt_key(g.prompt) not in held], [  # type: ignore[attr-defined]
        g
        for g in groups
        if prompt_key(g.prompt) in held  # type: ignore[attr-defined]
    ]
