"""Reward sources for RL, all behind the TRL-compatible signature
``fn(prompts, completions, **columns) -> list[float | None]`` (None: not scored; left out of baselines).

Light to import: models and pipelines are loaded only when a source that needs them is built.
"""

from heed.rewards.builtin import BUILTINS, banana_format, banana_success, length_penalty
from heed.rewards.combine import (
    RewardBatch,
    RewardError,
    RewardSet,
    RewardSource,
    build_rewards,
    build_source,
)
from heed.rewards.sources import function_source, pipeline_source, resolve_callable, reward_model_source

__all__ = [
    "BUILTINS",
    "RewardBatch",
    "RewardError",
    "RewardSet",
    "RewardSource",
    "banana_format",
    "banana_success",
    "build_rewards",
    "build_source",
    "function_source",
    "length_penalty",
    "pipeline_source",
    "resolve_callable",
    "reward_model_source",
]
