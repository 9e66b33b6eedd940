"""The generation engine behind RL rollouts and evaluation: one small function, so another engine
(vLLM) can slot in later without touching the training loop.

An engine is a callable ``(model, tokenizer, prompt_ids, params, num_samples, keys=None) -> Generation``
(``keys``: one int64 per output row that fixes its random draws, where the engine supports it);
after each update the trainer calls it with the current policy, so an engine that keeps its own
copy of the weights must refresh them there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from heed.errors import ConfigError
from heed.rollout.generate import Generation, SamplingParams, generate

Engine = Callable[..., Generation]


ENGINES = ("heed", "hf")
PLANNED = ("vllm",)


def check_vllm() -> None:
    """Why ``rollout.engine: vllm`` cannot run here, as one line naming the fix (it never returns)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ConfigError("rollout.engine: vllm needs a CUDA GPU and none is visible; use rollout.engine: heed (or hf)")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.engine: vllm is not installed; install the GPU extra (pip install 'heed[vllm]') "
                          "or use rollout.engine: heed")
    raise ConfigError("rollout.engine: the vllm engine is not implemented in this version of Heed yet "
                      "(see docs/scale.md); use rollout.engine: heed (or hf)")


def make_engine(name: str, batch_size: int) -> Engine:
    """``heed``: Heed's KV-cache sampling loop (:mod:`heed.rollout.sampler`); ``hf``: ``model.generate``.
    Both use left padding and prompts sorted by length. ``vllm`` is planned: asking for it is a clear error."""
    if name == "vllm":
        check_vllm()
    if name not in ENGINES:
        raise ConfigError(f"rollout.engine: unknown engine {name!r}; expected one of {', '.join(ENGINES)}")

    def run(model: Any, tokenizer: Any, prompt_ids: list[list[int]], params: SamplingParams,
            num_samples: int, keys: Any = None) -> Generation:
        return generate(model, tokenizer, prompt_ids, params, num_samples=num_samples, batch_size=batch_size,
                        engine=name, keys=keys)

    return run
