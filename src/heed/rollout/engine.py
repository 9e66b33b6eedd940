"""The generation engine behind RL rollouts and evaluation: one small function, so another engine
(vLLM) can slot in later without touching the training loop.

An engine is a callable ``(model, tokenizer, prompt_ids, params, num_samples) -> Generation``;
after each update the trainer calls it with the current policy, so an engine that keeps its own
copy of the weights must refresh them there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from heed.errors import ConfigError
from heed.rollout.generate import Generation, SamplingParams, generate

Engine = Callable[[Any, Any, list[list[int]], SamplingParams, int], Generation]


ENGINES = ("heed", "hf")


def make_engine(name: str, batch_size: int) -> Engine:
    """``heed``: Heed's KV-cache sampling loop (:mod:`heed.rollout.sampler`); ``hf``: ``model.generate``.
    Both use left padding and prompts sorted by length."""
    if name not in ENGINES:
        raise ConfigError(f"rollout.engine: unknown engine {name!r}; expected one of {', '.join(ENGINES)}")

    def run(model: Any, tokenizer: Any, prompt_ids: list[list[int]], params: SamplingParams,
            num_samples: int) -> Generation:
        return generate(model, tokenizer, prompt_ids, params, num_samples=num_samples, batch_size=batch_size,
                        engine=name)

    return run
