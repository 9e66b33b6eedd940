"""The generation engine behind RL rollouts and evaluation: one small function, so another engine
(vLLM) can slot in later without touching the training loop.

An engine is a callable ``(model, tokenizer, prompt_ids, params, num_samples, keys=None) -> Generation``
(``keys``: one int64 per output row that fixes its random draws, where the engine supports it);
after each update the trainer calls it with the current policy, so an engine that keeps its own
copy of the weights must refresh them there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from heed.errors import ConfigError
from heed.rollout.generate import Generation, SamplingParams, generate

Engine = Callable[..., Generation]


ENGINES = ("heed", "hf", "vllm")


def make_engine(
    name: str,
    batch_size: int,
    model_path: str | None = None,
    seed: int = 0,
    vllm_options: dict[str, Any] | None = None,
) -> Engine:
    """``heed``: Heed's KV-cache sampling loop (:mod:`heed.rollout.sampler`); ``hf``: ``model.generate``
    (both with left padding and prompts sorted by length); ``vllm``: an in-process vLLM engine
    started from ``model_path`` (:mod:`heed.rollout.vllm_engine`; GPU only)."""
    if name not in ENGINES:
        raise ConfigError(f"rollout.engine: unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
    if name == "vllm":
        from heed.rollout.vllm_engine import VLLMEngine

        if model_path is None:
            raise ConfigError("rollout.engine: vllm needs the policy's model folder")
        return VLLMEngine(model_path, seed=seed, **(vllm_options or {}))

    def run(
        model: Any,
        tokenizer: Any,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        num_samples: int,
        keys: Any = None,
    ) -> Generation:
        return generate(
            model,
            tokenizer,
            prompt_ids,
            params,
            num_samples=num_samples,
            batch_size=batch_size,
            engine=name,
            keys=keys,
        )

    return run


@dataclass(frozen=True)
class PolicySampler:
    """A policy and how its answers are drawn: the engine, the sampling settings, and the seed that,
    with a stream number (an update, a round) and each prompt's index, keys every answer's random draws,
    so the answers do not depend on batching or on which process draws them."""

    policy: Any
    tokenizer: Any
    engine: Engine
    sampling: SamplingParams
    seed: int

    def answers(self, prompt_ids: Sequence[list[int]], idx: Sequence[int], k: int, stream: int) -> Generation:
        """``k`` answers to each prompt ``prompt_ids[i]`` for ``i`` in ``idx``, prompt-major."""
        from heed.rollout.sampler import row_keys

        keys = row_keys(self.seed, [(stream << 32) + i * k + j for i in idx for j in range(k)])
        return self.engine(
            self.policy, self.tokenizer, [prompt_ids[i] for i in idx], self.sampling, k, keys=keys
        )
